"""The tiny reference checkpoint's golden logits with every MoE layer on the Triton kernels: on CPU by
triton's interpreter (float32 there, as on a GPU with float32 activations), and on a CUDA GPU when
there is one (float32 to the contract, bfloat16 loosely, as the reference README says)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import golden_prompts
from tests.interpreter import IN_INTERPRETER, run_file_under_interpreter

TOL = 1e-3  # ../shared/grok1-reference/README.md


@pytest.fixture(scope="module")
def triton_model(tiny_reference):
    from services.model import load_model

    model = load_model(tiny_reference, "float32")
    model.use_moe_backend("triton")
    return model


class _InterpreterChecks:
    def test_moe_runs_the_triton_kernels(self, triton_model, golden_f32, monkeypatch):
        # Proves the dispatch is not quietly taking the torch path.
        from kernels import triton_moe

        calls = []
        original = triton_moe.fused_moe_triton
        monkeypatch.setattr(triton_moe, "fused_moe_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
        triton_model.score(golden_f32["prompt_0"])
        assert len(calls) == triton_model.config.num_layers

    @pytest.mark.parametrize("chunk", [None, 3])
    def test_logits_match_reference(self, triton_model, golden_f32, chunk):
        # None: one prefill per prompt; 3: chunked prefill through the paged KV cache (prompt 2 only,
        # to keep the interpreter's time down).
        prompts = golden_prompts(golden_f32) if chunk is None else [2]
        for j in prompts:
            logits = triton_model.score(golden_f32[f"prompt_{j}"], chunk_size=chunk)
            err = np.abs(logits - golden_f32[f"logits_{j}"]).max()
            assert err <= TOL, f"prompt {j}: max |logit - golden| = {err}"

    def test_greedy_tokens_match_reference(self, triton_model, golden_f32):
        expected = golden_f32["greedy_0"].tolist()[:8]
        got = triton_model.generate(golden_f32["prompt_0"], len(expected), stop_token_ids=())
        assert got == expected


if IN_INTERPRETER:
    TestInterpreter = _InterpreterChecks
else:
    @pytest.mark.slow
    def test_golden_logits_on_the_triton_path():
        run_file_under_interpreter(__file__)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestOnCuda:
    """int8 experts stay int8 on CUDA: the W8A16 kernels run, compiled for the device."""

    @pytest.mark.parametrize("chunk", [None, 3])
    def test_float32_logits_match_reference(self, tiny_reference, golden_f32, chunk):
        from services.model import load_model

        model = load_model(tiny_reference, "float32", device="cuda")
        model.use_moe_backend("triton")
        for j in golden_prompts(golden_f32):
            logits = model.score(golden_f32[f"prompt_{j}"], chunk_size=chunk)
            err = np.abs(logits - golden_f32[f"logits_{j}"]).max()
            assert err <= TOL, f"prompt {j}: max |logit - golden| = {err}"

    def test_bfloat16_first_positions_close(self, tiny_reference, golden_f32):
        from services.model import load_model

        model = load_model(tiny_reference, "bfloat16", device="cuda")
        model.use_moe_backend("triton")
        for j in golden_prompts(golden_f32):
            # The first position has no earlier routing to flip: close in every bfloat16 run.
            first = model.score(golden_f32[f"prompt_{j}"][:1])[0].astype(np.float64)
            want = golden_f32[f"logits_{j}"][0].astype(np.float64)
            cosine = first @ want / (np.linalg.norm(first) * np.linalg.norm(want))
            assert cosine > 0.999, f"prompt {j}: cosine {cosine}"
