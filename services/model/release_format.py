"""The released Grok-1 checkpoint format: `ckpt-0/tensorNNNNN_000`, one pickle per parameter.

Pickles execute code when loaded, so they are read with an unpickler that resolves only the handful of
globals a numpy array and the release's `QuantizedWeight8bit` record need; anything else is refused
before it can run. The files carry no names: the n-th file is the n-th leaf of the parameter tree in
tree-flatten order, i.e. parameter paths sorted as strings (so layer 10 comes before layer 2).
"""
from __future__ import annotations

import io
import mmap
import pickle
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from services.model.config import Grok1Config

_LAYER_PARAMS = (
    "moe/linear/w", "moe/linear_1/w", "moe/linear_v/w",
    "multi_head_attention/key/w", "multi_head_attention/linear/w",
    "multi_head_attention/query/w", "multi_head_attention/value/w",
    "rms_norm/scale", "rms_norm_1/scale", "rms_norm_2/scale", "rms_norm_3/scale", "router/w",
)
QUANTIZED_PARAMS = frozenset(p for p in _LAYER_PARAMS if p.startswith(("moe/", "multi_head_attention/")))
_ALLOWED_DTYPES = {np.dtype(np.int8), np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16),
                   np.dtype(np.float16)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


class QuantizedWeight8bit:
    """The release's int8 weight record: `weight` int8 [..., in, out], `scales` bfloat16 [..., R, out]."""

    __slots__ = ("scales", "weight")

    def __init__(self, weight: np.ndarray | None = None, scales: np.ndarray | None = None):
        self.weight, self.scales = weight, scales

    def __setstate__(self, state) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
            state = state[1]  # (dict, slots) form
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            raise pickle.UnpicklingError("QuantizedWeight8bit state must hold exactly 'weight' and 'scales'")
        self.weight, self.scales = state["weight"], state["scales"]

    def __getstate__(self):
        return {"weight": self.weight, "scales": self.scales}


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("ml_dtypes", "bfloat16"): lambda: ml_dtypes.bfloat16,
    # The release pickled its record class from the script it ran (`__main__`) or from model.py.
    ("__main__", "QuantizedWeight8bit"): lambda: QuantizedWeight8bit,
    ("model", "QuantizedWeight8bit"): lambda: QuantizedWeight8bit,
}


def _find_allowed(module: str, name: str):
    factory = _ALLOWED_GLOBALS.get((module, name))
    if factory is None:
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}': only numpy arrays "
                                     f"and QuantizedWeight8bit records are allowed in a checkpoint")
    return factory()


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        return _find_allowed(module, name)


# Array payloads at least this large are mapped from the file instead of read into memory.
MAP_THRESHOLD = 1 << 20


class _FileRegion:
    """Where an array's raw bytes lie in the file (pickle protocol 4 writes large bytes unframed)."""

    __slots__ = ("length", "offset")

    def __init__(self, offset: int, length: int):
        self.offset, self.length = offset, length


class _PendingArray:
    """Stands in for numpy's _reconstruct result until BUILD hands it its state."""

    __slots__ = ("array", "path")

    def __init__(self, path: Path):
        self.path, self.array = path, None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("unexpected numpy array state")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, np.dtype) or dtype not in _ALLOWED_DTYPES:
            raise pickle.UnpicklingError(f"array dtype {dtype} is not allowed in a checkpoint")
        order = "F" if fortran else "C"
        if isinstance(raw, _FileRegion):
            count = int(np.prod(shape, dtype=np.int64))
            if raw.length != count * dtype.itemsize:
                raise pickle.UnpicklingError(f"array of {shape} {dtype} stored in {raw.length} bytes")
            self.array = np.memmap(self.path, dtype=dtype, mode="r", offset=raw.offset, shape=tuple(shape),
                                   order=order)
        else:
            self.array = np.frombuffer(raw, dtype=dtype).reshape(shape, order=order).copy()


class _MappingUnpickler(pickle._Unpickler):
    """The restricted unpickler (pure Python, so that opcodes can be overridden) that maps large array
    payloads from the file: a loader then copies only this rank's slice, a chunk at a time, and a
    300 GB checkpoint is never held twice."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self._raw, self._path = file, path
        self.dispatch = {**pickle._Unpickler.dispatch, pickle.BINBYTES8[0]: _MappingUnpickler._binbytes8,
                         pickle.BINBYTES[0]: _MappingUnpickler._binbytes}

    def find_class(self, module: str, name: str):
        cls = _find_allowed(module, name)
        if cls is _numpy_reconstruct():
            return lambda *_: _PendingArray(self._path)
        return cls

    def _bytes(self, length: int) -> None:
        if length < MAP_THRESHOLD or self._unframer.current_frame is not None:
            self.append(self.read(length))
            return
        offset = self._raw.tell()
        self._raw.seek(length, io.SEEK_CUR)
        self.append(_FileRegion(offset, length))

    def _binbytes8(self) -> None:
        self._bytes(struct.unpack("<Q", self.read(8))[0])

    def _binbytes(self) -> None:
        self._bytes(struct.unpack("<I", self.read(4))[0])


def _resolved(value):
    if isinstance(value, _PendingArray):
        return value.array
    if isinstance(value, QuantizedWeight8bit):
        value.weight, value.scales = _resolved(value.weight), _resolved(value.scales)
    return value


def drop_mapped_pages(array: np.ndarray) -> None:
    """Unmaps the pages of a file-mapped array that this process touched (they stay in the page
    cache): copying a mapped tensor chunk by chunk then keeps one chunk resident, not the tensor."""
    base = array
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    handle = getattr(base, "_mmap", None)
    if isinstance(handle, mmap.mmap) and hasattr(handle, "madvise"):
        handle.madvise(mmap.MADV_DONTNEED)


def _check_array(value, path: Path, what: str) -> None:
    if not isinstance(value, np.ndarray) or value.dtype not in _ALLOWED_DTYPES:
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise CheckpointError(f"{path}: {what} is {kind}, expected an int8/float32/bfloat16 array")


def read_tensor(path: Path, mapped: bool = False):
    """One release file: a numpy array or a QuantizedWeight8bit, loaded without running foreign code.
    mapped: arrays of MAP_THRESHOLD bytes or more come back as read-only np.memmap views of the file."""
    try:
        with open(path, "rb") as f:
            if mapped:
                value = _resolved(_MappingUnpickler(f, Path(path)).load())
            else:
                value = RestrictedUnpickler(io.BufferedReader(f, buffer_size=1 << 24)).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing checkpoint file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            MemoryError) as exc:
        reason = "truncated file" if isinstance(exc, EOFError) else str(exc) or type(exc).__name__
        raise CheckpointError(f"{path}: cannot unpickle: {reason}") from None
    if isinstance(value, QuantizedWeight8bit):
        _check_array(value.weight, path, "QuantizedWeight8bit.weight")
        _check_array(value.scales, path, "QuantizedWeight8bit.scales")
        if value.weight.dtype != np.int8:
            raise CheckpointError(f"{path}: QuantizedWeight8bit.weight is {value.weight.dtype}, expected int8")
    else:
        _check_array(value, path, "the stored object")
    return value


def param_names(config: Grok1Config) -> list[str]:
    """Release parameter paths in file order (tree-flatten order: sorted as strings)."""
    names = ["language_model/in_out_embed/embeddings", "language_model/rms_norm/scale"]
    names += [f"transformer/decoder_layer_{i}/{p}" for i in range(config.num_layers) for p in _LAYER_PARAMS]
    return sorted(names)


def tensor_path(root: Path, index: int) -> Path:
    return root / "ckpt-0" / f"tensor{index:05d}_000"


def is_release_dir(root: Path) -> bool:
    return tensor_path(root, 0).exists()


def write_tensor(path: Path, value) -> None:
    """Write one release-format file (used by tests and tools that make small checkpoints)."""
    with open(path, "wb") as f:
        _ReleasePickler(f, protocol=4).dump(value)


class _ReleasePickler(pickle._Pickler):
    # The release names its record `__main__.QuantizedWeight8bit` (the script that wrote it); write that
    # name without needing such a class in this process's __main__.
    def save_global(self, obj, name=None):
        if obj is QuantizedWeight8bit:
            self.save("__main__")
            self.save("QuantizedWeight8bit")
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
            return
        super().save_global(obj, name)
