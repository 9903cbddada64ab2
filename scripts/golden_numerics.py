"""How close the model's logits come to the reference's float32 golden logits, per compute dtype and
expert storage: cosine, max |delta| and argmax agreement at every prompt position.

    python scripts/golden_numerics.py [--device cuda] [--dtypes float32,bfloat16]
        [--experts int8,dequantized] [--moe-backend auto|torch|triton]

Expert storage "int8" keeps the released int8 experts and runs the W8A16 numerics (int8 exact in
the activation dtype, scales applied to float32 sums); "dequantized" dequantizes them once at load
to the compute dtype, which rounds every dequantized weight to bfloat16 in a bfloat16 run: the
numerics of the reference's bfloat16 run, and of this project's int8 kernels before W8A16.
Attention weights are dequantized to the compute dtype in both. Reads the tiny reference checkpoint
at ../shared/grok1-reference/tiny (or --reference); exits 0 with a message when it is absent.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.model import load_model

DEFAULT_REFERENCE = REPO.parent / "shared" / "grok1-reference" / "tiny"

# Legend: P = positions of a prompt, V = vocabulary.


def compare(logits: np.ndarray, golden: np.ndarray) -> dict[str, float]:
    """logits, golden [P, V] -> cosine per position (min, mean), max |delta|, argmax agreement."""
    a, b = logits.astype(np.float64), golden.astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "max_abs": float(np.abs(a - b).max()),
            "argmax_same": int((a.argmax(-1) == b.argmax(-1)).sum()), "positions": int(a.shape[0])}


def summarize(rows: list[dict]) -> dict:
    return {"cos_min": min(r["cos_min"] for r in rows),
            "cos_mean": float(np.mean([r["cos_mean"] for r in rows])),
            "max_abs": max(r["max_abs"] for r in rows),
            "argmax_same": sum(r["argmax_same"] for r in rows), "positions": sum(r["positions"] for r in rows),
            # One near-tied top-2 expert choice flipped by rounding changes every later position of
            # that prompt: the worst position per prompt shows which prompts diverged.
            "per_prompt": " / ".join(f"{r['cos_min']:.4f}" for r in rows)}


def prompts(golden: dict[str, np.ndarray]) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in golden if k.startswith("prompt_"))


def measure(reference: Path, device: str, dtype: str, experts: str, backend: str,
            golden: dict[str, np.ndarray]) -> dict:
    # Attention's int8 weights dequantize to the compute dtype at every call either way: the two
    # settings differ in the MoE layers only.
    model = load_model(reference, dtype, int8=experts == "int8", device=device)
    model.use_moe_backend(backend)
    started = time.perf_counter()
    rows = [compare(model.score(golden[f"prompt_{j}"]), golden[f"logits_{j}"]) for j in prompts(golden)]
    return {**summarize(rows), "seconds": time.perf_counter() - started}


def row(label: str, experts: str, r: dict) -> str:
    seconds = "-" if "seconds" not in r else f"{r['seconds']:.1f}"
    return (f"| {label} | {experts} | {r['cos_min']:.6f} | {r['cos_mean']:.6f} | {r['max_abs']:.2e} "
            f"| {r['argmax_same']} / {r['positions']} | {r['per_prompt']} | {seconds} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--experts", default="int8,dequantized", help="int8 (W8A16), dequantized (at load)")
    parser.add_argument("--moe-backend", default="auto", help="auto, torch, triton")
    parser.add_argument("--against", default="float32", help="golden file: float32 or bfloat16")
    args = parser.parse_args(argv)
    if not (args.reference / "ckpt-0").is_dir():
        print(f"reference checkpoint not found at {args.reference}: nothing measured")
        return 0
    golden = dict(np.load(args.reference / f"golden_{args.against}.npz"))
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f", MoE backend {args.moe_backend}, against golden_{args.against}.npz")
    print("| dtype | experts | cosine min | cosine mean | max abs delta | argmax agreement "
          "| cosine min per prompt | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    if args.against == "float32":
        # The reference's own bfloat16 run (JAX, released numerics): what bfloat16 costs at best.
        bf16 = dict(np.load(args.reference / "golden_bfloat16.npz"))
        print(row("bfloat16, JAX reference", "dequantized", summarize(
            [compare(bf16[f"logits_{j}"], golden[f"logits_{j}"]) for j in prompts(golden)])))
    for dtype in args.dtypes.split(","):
        for experts in args.experts.split(","):
            r = measure(args.reference, args.device, dtype, experts, args.moe_backend, golden)
            print(row(dtype, experts, r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
