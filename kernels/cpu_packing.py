"""float32 weights re-laid out once for oneDNN's CPU GEMM (its blocked "packed" format).

A weight kept in its plain layout is re-blocked by oneDNN on every call; packed once at load, the
small-row GEMMs of a decode step run on the blocked kernels directly. Measured on one thread of an
AVX-512 EPYC, weights streamed from DRAM: packed beats plain [out, in] storage from 3 rows on (about
19 against 12 GB/s of weights at 4 to 6 rows), and loses at 1 row (15 against 20 GB/s), where the
plain GEMV kernel wins; callers keep both and choose by rows. Results equal the plain oneDNN path's
to the last bits except where the two take different kernels.
"""
from __future__ import annotations

import torch


def _linear():
    try:
        if torch.backends.mkldnn.is_available():
            return torch.ops.mkldnn._linear_pointwise, torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):
        pass
    return None


_ONEDNN = _linear()


def pack_weight(w: torch.Tensor) -> torch.Tensor | None:
    """w [K, N] float32 on CPU (either storage order) -> an opaque packed weight for `packed_matmul`,
    or None where packing does not apply (another dtype or device, no oneDNN)."""
    if _ONEDNN is None or w.dtype != torch.float32 or w.device.type != "cpu" or w.dim() != 2:
        return None
    return _ONEDNN[1](w.t().contiguous(), None)  # oneDNN takes [N, K], nn.Linear's order


def packed_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x float32 [T, K] @ the packed [K, N] weight -> [T, N]."""
    if x.shape[0] == 2:
        # oneDNN's two-row kernel streams the weight at about 12 GB/s against 18 at three rows (same
        # machine as above): a zero third row costs no extra weight traffic.
        return _ONEDNN[0](torch.cat([x, x.new_zeros(1, x.shape[1])]), packed, None, "none", [], "")[:2]
    return _ONEDNN[0](x, packed, None, "none", [], "")
