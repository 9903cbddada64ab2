"""Weights re-laid out once for oneDNN's CPU GEMM (its blocked "packed" format): float32 always,
bfloat16 where the CPU has native bfloat16 dot products (AVX512_BF16 or AMX).

A weight kept in its plain layout is re-blocked by oneDNN on every call; packed once at load, the
small-row GEMMs of a decode step run on the blocked kernels directly. Measured on one thread of an
AVX-512 EPYC, weights streamed from DRAM: packed beats plain [out, in] storage from 3 rows on (about
19 against 12 GB/s of weights at 4 to 6 rows), and loses at 1 row (15 against 20 GB/s), where the
plain GEMV kernel wins; callers keep both and choose by rows. Results equal the plain oneDNN path's
to the last bits except where the two take different kernels.

bfloat16 packed weights stream at the same bytes per second as float32 ones, at every row count from
one on, so a bfloat16 step reads its weights in about half the time (same machine: 0.47 against
0.79 ms for a 4096 x 1024 weight at one row, 0.58 against 1.19 at eight). Without native bfloat16
oneDNN emulates it and torch's own kernels are the better choice, so nothing is packed there.
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
ONEDNN_AVAILABLE = _ONEDNN is not None


def _native_bfloat16() -> bool:
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe is not None and probe() for probe in probes)


PACKED_DTYPES = (torch.float32, torch.bfloat16) if _native_bfloat16() else (torch.float32,)


def pack_weight(w: torch.Tensor) -> torch.Tensor | None:
    """w [K, N] on CPU (either storage order, a dtype in PACKED_DTYPES) -> an opaque packed weight
    for `packed_matmul`, or None where packing does not apply (another dtype or device, no oneDNN)."""
    if _ONEDNN is None or w.dtype not in PACKED_DTYPES or w.device.type != "cpu" or w.dim() != 2:
        return None
    return _ONEDNN[1](w.t().contiguous(), None)  # oneDNN takes [N, K], nn.Linear's order


# oneDNN keeps state for every distinct row count a weight shape is called with (0.5 to 0.8 MB each,
# never released): an engine serving mixed batch sizes grew by hundreds of MB. Row counts are rounded
# up to a bounded set instead: exact up to EXACT_ROWS, then ROUNDINGS_PER_OCTAVE sizes per power of
# two, so at most 1/8 of a call's rows are padding and a weight shape sees at most
# EXACT_ROWS + 8 * log2(rows / EXACT_ROWS) distinct counts.
EXACT_ROWS = 16
ROUNDINGS_PER_OCTAVE = 8


def padded_rows(n: int) -> int:
    """The row count oneDNN is called with for n rows."""
    if n <= EXACT_ROWS:
        return n
    octave = 1 << ((n - 1).bit_length() - 1)  # octave < n <= 2 * octave
    step = octave // ROUNDINGS_PER_OCTAVE
    return -(-n // step) * step


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, min_rows: int = 1) -> torch.Tensor:
    """x [T, K] @ weight [N, K] (plain [out, in] or packed, x's dtype) through oneDNN, on padded_rows(T)
    rows (at least min_rows); zero rows cost no extra weight traffic and are dropped from the result.
    The result has x's dtype: bfloat16 accumulates in float32 and rounds once."""
    n = x.shape[0]
    rows = max(padded_rows(n), min_rows)
    if rows != n:
        padded = x.new_zeros(rows, x.shape[1])
        padded[:n] = x
        x = padded
    out = _ONEDNN[0](x, weight, None, "none", [], "")
    return out if rows == n else out[:n]


def packed_matmul(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [T, K] @ the packed [K, N] weight (x's dtype) -> [T, N] in x's dtype."""
    # oneDNN's float32 two-row kernel streams the weight at about 12 GB/s against 18 at three rows
    # (same machine as above): two rows run as three.
    two_as_three = x.shape[0] == 2 and x.dtype == torch.float32
    return onednn_linear(x, packed, min_rows=3 if two_as_three else 1)
