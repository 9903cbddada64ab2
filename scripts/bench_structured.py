"""Engine throughput with 0 %, 50 % and 100 % of the requests under a structured-output constraint, in
one process, the three mixes alternating over the repetitions so that each sees the same machine state.

Every request generates exactly --output-len tokens (greedy): a constrained one a JSON object
{"text": "..."} whose string has a fixed length (the tiny model's tokenizer has one token per byte and
the pattern allows ASCII only), so all mixes do the same model work and differ only in the masking.
The schema is compiled once before timing (the engine caches it; compilation is admission work).

    python scripts/bench_structured.py [--model tiny] [--requests 32] [--output-len 128] [--reps 3]
"""
from __future__ import annotations

import argparse
import json
import random
import statistics

import torch

from services.engine.benchmark import cpu_name, timed_generate
from services.engine.llm import LLM
from services.engine.sampling_params import SamplingParams
from services.engine.structured_output import StructuredOutput

# {"text":"<n characters>"} has 11 characters around the string.
_FRAME = len('{"text":""}')


def constraint(output_len: int) -> StructuredOutput:
    chars = output_len - _FRAME
    return StructuredOutput.json_schema({
        "type": "object", "properties": {"text": {"type": "string", "pattern": f"^[a-z ]{{{chars}}}$"}},
        "required": ["text"], "additionalProperties": False})


def run(llm: LLM, prompts: list[list[int]], constrained: int, output_len: int) -> dict:
    plain = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    shaped = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True,
                            structured_output=constraint(output_len))
    # Constrained rows spread over the batch rather than bunched at one end.
    params = [shaped if (i * constrained) % len(prompts) < constrained else plain for i in range(len(prompts))]
    run = timed_generate(llm, prompts, params)
    generated = sum(len(o.outputs[0].token_ids) for o in run.outputs)
    for out, p in zip(run.outputs, params):
        if p.structured_output is not None:
            json.loads(out.outputs[0].text)  # the constraint held
    return {"constrained": constrained, "generated": generated, "elapsed_s": run.elapsed_s,
            "tok_s": generated / run.elapsed_s, "overhead_ms_per_step": 1000 * run.overhead_s / max(run.steps, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    llm = LLM(args.model, max_num_seqs=args.requests)
    rng = random.Random(0)
    vocab = llm.engine.model.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    mixes = [0, args.requests // 2, args.requests]
    for mix in mixes:  # warm-up, and the schema's one compilation
        run(llm, prompts[:4], min(mix, 4), args.output_len)
    results: dict[int, list[dict]] = {m: [] for m in mixes}
    for _ in range(args.reps):
        for mix in mixes:
            results[mix].append(run(llm, prompts, mix, args.output_len))
    print(f"model={args.model} requests={args.requests} prompt_len={args.prompt_len} "
          f"output_len={args.output_len} reps={args.reps} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} cpu={cpu_name()}")
    print("| constrained | output tok/s (median) | min - max | engine overhead ms/step (median) |")
    print("|---|---|---|---|")
    for mix in mixes:
        rates = [r["tok_s"] for r in results[mix]]
        overheads = [r["overhead_ms_per_step"] for r in results[mix]]
        print(f"| {mix}/{args.requests} ({100 * mix // args.requests} %) | {statistics.median(rates):.1f} | "
              f"{min(rates):.1f} - {max(rates):.1f} | {statistics.median(overheads):.2f} |")


if __name__ == "__main__":
    main()
