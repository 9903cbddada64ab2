"""Loading Grok-1 weights: the release pickles, converted safetensors, or deterministic random weights.

Every format yields (release name, array or QuantizedWeight8bit) one tensor at a time; `assign` checks
the shape, keeps this rank's slice and copies it into the model, so the whole checkpoint is never held
twice and a rank never materialises what other ranks own.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from services.model import release_format
from services.model.config import PRESETS, Grok1Config
from services.model.grok1 import Grok1
from services.model.quant import dequantize, quantize
from services.model.release_format import CheckpointError, QuantizedWeight8bit
from services.model.shard import Comm, Shard
from services.model.weight_map import release_shape, shard_index, target

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How experts are kept: auto (int8 when the model keeps int8 weights, else the compute dtype), int8
# (as released, W8A16 kernels), or a float dtype (dequantized once at load).
EXPERT_DTYPES = ("auto", "int8", *TORCH_DTYPES)
LOAD_FORMATS = ("auto", "release", "safetensors", "hf", "dummy")
SAFETENSORS_INDEX = "model.safetensors.index.json"
SCALES_SUFFIX = ":scales"


class Progress:
    """Bytes of a checkpoint done out of its total, reported every few seconds with the rate and the
    time left, as someone loading 300 GB expects. Quiet below min_total (tests, small models)."""

    def __init__(self, label: str, total_bytes: int, every_s: float = 5.0, min_total: int = 1 << 30,
                 stream=None):
        self.label, self.total, self.every_s = label, max(1, total_bytes), every_s
        self.quiet = total_bytes < min_total
        self.stream = stream or sys.stderr
        self.done, self.started = 0, time.perf_counter()
        self.last = self.started

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        now = time.perf_counter()
        if now - self.last >= self.every_s:
            self.last = now
            self.report()

    def report(self, final: bool = False) -> None:
        if self.quiet:
            return
        elapsed = max(1e-9, time.perf_counter() - self.started)
        rate = self.done / elapsed
        if final:
            # A rank of a parallel group reads only its share of the total.
            print(f"{self.label}: {self.done / 1e9:.2f} GB at {rate / 1e9:.2f} GB/s, done in {elapsed:.1f} s",
                  file=self.stream, flush=True)
            return
        left = max(0.0, (self.total - self.done) / max(rate, 1e-9))
        print(f"{self.label}: {self.done / 1e9:.2f} / {self.total / 1e9:.2f} GB ({min(1.0, self.done / self.total):.0%}), "
              f"{rate / 1e9:.2f} GB/s, {left:.0f} s left", file=self.stream, flush=True)


def checkpoint_bytes(path: Path | None) -> int:
    if path is None:
        return 0
    files = [f for pattern in ("ckpt-0/tensor*", "*.safetensors", "pytorch_model*.bin") for f in path.glob(pattern)]
    return sum(f.stat().st_size for f in files)


def value_bytes(value) -> int:
    weight, scales = _parts(value)
    return int(getattr(weight, "nbytes", 0)) + (0 if scales is None else int(scales.nbytes))


def to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    array = np.ascontiguousarray(array)
    if array.flags.writeable:
        return torch.from_numpy(array)
    # A read-only view of a mapped file, only ever a copy's source: no need to copy it first.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def detect_format(path: Path) -> str:
    if release_format.is_release_dir(path):
        return "release"
    if (path / SAFETENSORS_INDEX).exists() or any(path.glob("*.safetensors")):
        from services.model.hf_format import is_hf_dir
        return "hf" if is_hf_dir(path) else "safetensors"
    if any(path.glob("pytorch_model*.bin")):
        return "hf"
    raise CheckpointError(f"{path}: no checkpoint found (expected ckpt-0/tensor00000_000, *.safetensors "
                          f"or pytorch_model*.bin)")


def iter_release(path: Path, config: Grok1Config) -> Iterator[tuple[str, object, Path, bool]]:
    """Large arrays come mapped from their files: assign copies only this rank's part, chunk by chunk."""
    for index, name in enumerate(release_format.param_names(config)):
        file = release_format.tensor_path(path, index)
        yield name, release_format.read_tensor(file, mapped=True), file, False


def _parts(value) -> tuple[np.ndarray, np.ndarray | None]:
    if isinstance(value, QuantizedWeight8bit):
        return value.weight, value.scales
    return value, None


def _local_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    return np.broadcast_to(np.empty((), np.int8), shape)[index].shape


def assign(model: Grok1, name: str, value, source: Path | str, sliced: bool = False) -> None:
    """Check one released parameter against the config and copy this rank's part into the model.

    `value` is the full parameter, or (sliced=True) already this rank's part, read from an mmap."""
    config, shard = model.config, model.shard
    t = target(name)
    weight, scales = _parts(value)
    if scales is not None and release_shape(name, config)[1] is None:
        raise CheckpointError(f"{source}: {name} is quantized, but Grok-1 keeps it in float32")
    want_w, want_s = release_shape(name, config)
    w_index = shard_index(t.split, want_w, config, shard, False)
    s_index = None if want_s is None else shard_index(t.split, want_s, config, shard, True)
    if sliced:
        want_w = _local_shape(want_w, w_index)
        want_s = None if want_s is None else _local_shape(want_s, s_index)
    got_w, got_s = tuple(weight.shape), None if scales is None else tuple(scales.shape)
    if got_w != tuple(want_w) or (got_s is not None and got_s != tuple(want_s)):
        raise CheckpointError(f"{source}: {name} has shape {got_w}"
                              f"{'' if got_s is None else f' with scales {got_s}'}, expected {tuple(want_w)}"
                              f"{'' if want_s is None else f' with scales {tuple(want_s)}'} for this config")
    weight = weight if sliced else weight[w_index]
    s = None if scales is None else to_torch(scales if sliced else scales[s_index])
    try:
        module = model.get_submodule(t.dest)
    except AttributeError:
        buffer = model.get_buffer(t.dest)  # float32 arrays as released (quantized ones refused above)
        copy_into(buffer, weight)
        return
    _assign_linear(module, weight, s, t.half)


# Bytes of a mapped array copied at a time: what a load holds beyond the weights it keeps.
COPY_CHUNK_BYTES = 64 << 20


def copy_into(dest: torch.Tensor, src: np.ndarray) -> None:
    """dest <- src (same shape), converting dtype. A file-mapped src is copied a chunk of leading
    rows at a time, its touched pages unmapped after each, so resident memory grows by the chunk."""
    if not isinstance(src, np.memmap) or src.nbytes <= COPY_CHUNK_BYTES:
        dest.copy_(to_torch(src))
        return
    row_bytes = src[0].nbytes if src.ndim > 1 else src.itemsize
    if src.ndim > 1 and row_bytes > COPY_CHUNK_BYTES:
        for i in range(src.shape[0]):
            copy_into(dest[i], src[i])
        return
    step = max(1, COPY_CHUNK_BYTES // row_bytes)
    for start in range(0, src.shape[0], step):
        dest[start:start + step].copy_(to_torch(src[start:start + step]))
        release_format.drop_mapped_pages(src)


def _assign_linear(module: torch.nn.Module, weight: np.ndarray, s: torch.Tensor | None, half: int | None) -> None:
    dest_w, dest_s = module.w, module.scales
    if half is not None:
        n = dest_w.shape[-1] // 2
        dest_w = dest_w[..., half * n:(half + 1) * n]
        dest_s = None if dest_s is None else dest_s[..., half * n:(half + 1) * n]
    if dest_s is not None and s is not None:  # int8 kept as released: straight copies
        copy_into(dest_w, weight)
        dest_s.copy_(s)
        return
    w = to_torch(weight)
    if dest_s is None:
        dest_w.copy_(w if s is None else dequantize(w, s, dest_w.dtype))
        return
    if s is None:  # a float checkpoint served as int8
        w, s = quantize(w.float(), dest_s.shape[-2])
    dest_w.copy_(w)
    dest_s.copy_(s)


_SAFETENSORS_DTYPES = {"I8": np.int8, "U8": np.uint8, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I32": np.int32, "I64": np.int64}


def safetensors_arrays(file: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as a read-only np.memmap of its bytes (8-byte header
    length, JSON header, then the data): slicing one reads only that slice, and assign copies it a
    chunk at a time."""
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise CheckpointError(f"{file}: not a safetensors file ({exc})") from None
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: {key} has dtype {info.get('dtype')}, which Grok-1 never stores")
        dtype, shape = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]), tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise CheckpointError(f"{file}: {key} holds {end - begin} bytes for shape {shape} {dtype}")
        out[key] = (np.memmap(file, dtype=dtype, mode="r", offset=8 + header_len + begin, shape=shape)
                    if end > begin else np.zeros(shape, dtype))
    return out


def iter_safetensors(path: Path, config: Grok1Config, shard: Shard) -> Iterator[tuple[str, object, Path, bool]]:
    """Converted checkpoints: release names as keys, int8 scales under `name:scales`; mapped, rank slices."""
    index_file = path / SAFETENSORS_INDEX
    files = {}
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    else:
        weight_map = {}
        for file in sorted(path.glob("*.safetensors")):
            files[file.name] = safetensors_arrays(file)
            weight_map.update(dict.fromkeys(files[file.name], file.name))
    for name in release_format.param_names(config):
        if name not in weight_map:
            raise CheckpointError(f"{path}: {name} is missing from the safetensors checkpoint")
        file = path / weight_map[name]
        if file.name not in files:
            files[file.name] = safetensors_arrays(file)
        arrays = files[file.name]
        full_w, split = release_shape(name, config)[0], target(name).split
        if tuple(arrays[name].shape) != tuple(full_w):
            raise CheckpointError(f"{file}: {name} has shape {tuple(arrays[name].shape)}, expected {tuple(full_w)}")
        weight = arrays[name][shard_index(split, full_w, config, shard, False)]
        scales = arrays.get(name + SCALES_SUFFIX)
        if scales is not None:
            scales = scales[shard_index(split, scales.shape, config, shard, True)]
        yield name, (weight if scales is None else QuantizedWeight8bit(weight, scales)), file, True


def dummy_weights(config: Grok1Config, seed: int) -> Iterator[tuple[str, object, str, bool]]:
    """Deterministic random weights in the release's form (int8 + bf16 scales where it quantizes)."""
    rng = np.random.default_rng(seed)
    for name in release_format.param_names(config):
        shape, scale_shape = release_shape(name, config)
        if name.endswith("scale"):
            yield name, np.ones(shape, np.float32), "dummy", False
            continue
        # Embeddings at 2/sqrt(D): the tied output then gives logits of std ~1, so sampling from a
        # random model is varied rather than stuck on one token.
        fan_in = shape[-2] if "embeddings" not in name else shape[-1] / 4
        w = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float32)
        if scale_shape is None:
            yield name, w, "dummy", False
        else:
            q, s = quantize(torch.from_numpy(w), scale_shape[-2])
            yield name, QuantizedWeight8bit(q.numpy(), s.float().numpy().astype(ml_dtypes.bfloat16)), "dummy", False


def resolve_source(source: str | Path, load_format: str = "auto") -> tuple[Grok1Config, Path | None, str]:
    """A preset name or a checkpoint directory -> (config, directory or None, concrete load format)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    source_str = str(source)
    if source_str in PRESETS:
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"{source_str!r} is a preset: it has only random (dummy) weights")
        return PRESETS[source_str], None, "dummy"
    path = Path(source)
    if not path.is_dir():
        raise ValueError(f"{source_str!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                         f"checkpoint directory")
    # The format decides how config.json reads: a Hugging Face one is not a reference config.
    if load_format == "auto":
        load_format = detect_format(path)
    if load_format == "hf":
        from services.model.hf_format import config_for_hf
        return config_for_hf(path), path, load_format
    return checkpoint_config(path, load_format), path, load_format


def checkpoint_config(path: Path, load_format: str) -> Grok1Config:
    """The configuration of a release or safetensors checkpoint: its config.json, or, without one, what
    the tensors' shapes show, read from the files' headers before any model memory is allocated.

    Shapes give the layer count, vocabulary, widths and experts, but not the attention head split, the
    multipliers or the rope base: so a directory without config.json is taken as Grok-1 (with the layer
    count its files hold) only when every shape is Grok-1's, and is refused otherwise, naming the first
    shape that differs."""
    if (path / "config.json").exists():
        return Grok1Config.from_dir(path)
    shape_of, layers = (_release_shapes(path) if load_format == "release" else _safetensors_shapes(path))
    grok1 = PRESETS["grok-1"].replace(num_layers=layers)
    for name in release_format.param_names(grok1.replace(num_layers=1)):
        found, expected = shape_of(name), release_shape(name, grok1)[0]
        if found != tuple(expected):
            raise CheckpointError(
                f"{path}: there is no config.json, and the tensors are not Grok-1's ({name} has shape "
                f"{found}, Grok-1's is {tuple(expected)}); the attention heads, multipliers and rope base "
                f"cannot be read from shapes: add the checkpoint's config.json")
    return grok1


def _weight_shape(value) -> tuple[int, ...]:
    return tuple(_parts(value)[0].shape)


def _release_shapes(path: Path):
    """(shape of a release name, layer count): a release holds 2 files plus 12 per layer, in the sorted
    order of their names; arrays are mapped, so reading a shape reads only a pickle's header."""
    count = len(list((path / "ckpt-0").glob("tensor*_000")))
    per_layer = len(release_format.param_names(PRESETS["tiny"].replace(num_layers=1))) - 2
    if count < 2 + per_layer or (count - 2) % per_layer:
        raise CheckpointError(f"{path}: there is no config.json, and its {count} tensor files are not a "
                              f"Grok-1 release's 2 + {per_layer} per layer: add the checkpoint's config.json")
    layers = (count - 2) // per_layer
    names = release_format.param_names(PRESETS["tiny"].replace(num_layers=layers))

    def shape_of(name: str) -> tuple[int, ...]:
        value = release_format.read_tensor(release_format.tensor_path(path, names.index(name)), mapped=True)
        return _weight_shape(value)

    return shape_of, layers


def _safetensors_shapes(path: Path):
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(path.glob("*.safetensors")):
        # The JSON header only: mapping every tensor would take the checkpoint's size in address space.
        with open(file, "rb") as f:
            try:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            except ValueError as exc:
                raise CheckpointError(f"{file}: not a safetensors file ({exc})") from None
        shapes.update((name, tuple(info["shape"])) for name, info in header.items()
                      if name != "__metadata__" and isinstance(info, dict) and "shape" in info)
    prefix, suffix = "transformer/decoder_layer_", "/router/w"
    layers = sum(1 for name in shapes if name.startswith(prefix) and name.endswith(suffix))
    if layers == 0:
        raise CheckpointError(f"{path}: there is no config.json, and no {prefix}N{suffix} tensor shows how "
                              f"many layers it has: add the checkpoint's config.json")

    def shape_of(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise CheckpointError(f"{path}: there is no config.json, and {name} is missing: add the "
                                  f"checkpoint's config.json")
        return shapes[name]

    return shape_of, layers


def load_weights(model: torch.nn.Module, path: Path | None, load_format: str, seed: int = 0) -> None:
    """Streams a checkpoint into a model whose modules carry the release's names (Grok1, or a model
    built around its layers), one tensor at a time; each rank keeps only its part (model.shard)."""
    config, shard = model.config, model.shard
    if load_format == "dummy":
        tensors = dummy_weights(config, seed)
    elif load_format == "release":
        tensors = iter_release(path, config)
    elif load_format == "safetensors":
        tensors = iter_safetensors(path, config, shard)
    else:
        from services.model.hf_format import iter_hf
        tensors = iter_hf(path, config)
    progress = Progress(f"loading {path}", checkpoint_bytes(path))
    with torch.no_grad():
        for name, value, file, sliced in tensors:
            assign(model, name, value, file, sliced)
            progress.advance(value_bytes(value))
    progress.report(final=True)


def load_model(source: str | Path, dtype: str = "float32", *, load_format: str = "auto", seed: int = 0,
               shard: Shard | None = None, comm: Comm | None = None, int8: bool | None = None,
               device: str | torch.device = "cpu", float32_residual: bool = True,
               expert_dtype: str = "auto") -> Grok1:
    """A preset name (random weights) or a checkpoint directory -> the model, ready for inference.

    int8 (default: only on CUDA) keeps int8 weights and their scales in memory, as the GPU kernels
    consume them; otherwise they are dequantized once at load, the fast path on CPU. expert_dtype
    (EXPERT_DTYPES) overrides that for the experts alone: "bfloat16" on an H200, where bf16 Grok-1
    fits, "int8" on an H100, where only int8 experts do (docs/parallelism.md).
    """
    if dtype not in TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    if expert_dtype not in EXPERT_DTYPES:
        raise ValueError(f"expert_dtype must be one of {EXPERT_DTYPES}, got {expert_dtype!r}")
    config, path, load_format = resolve_source(source, load_format)
    device = torch.device(device)
    if int8 is None:
        int8 = device.type == "cuda"
    experts = None if expert_dtype == "auto" else torch.int8 if expert_dtype == "int8" else TORCH_DTYPES[expert_dtype]
    model = Grok1(config, TORCH_DTYPES[dtype], int8=int8, shard=shard or Shard(), comm=comm,
                  float32_residual=float32_residual, expert_dtype=experts)
    load_weights(model, path, load_format, seed)
    model.source = str(source)
    if device.type == "cpu":
        model.store_experts_out_in()
        model.pack_for_cpu()
    return model.to(device).eval()
