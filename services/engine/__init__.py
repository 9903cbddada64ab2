"""The engine: `from services.engine import LLM, SamplingParams`, as with vLLM.

`LLM` loads on first use, so that the torch-free parts (api.py, sampling_params.py, outputs.py) stay
importable by a gateway without the model behind it.
"""
from __future__ import annotations

from services.engine.outputs import CompletionOutput, RequestOutput
from services.engine.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from services.engine.llm import LLM

        return LLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
