"""The Grok-1 model: config and presets, the PyTorch model, checkpoint loaders, tokenizer.

The names below load on first use: the tokenizer and chat template (used by torch-free gateways) are
modules of this package too, and importing them must not load torch and the model.
"""
from __future__ import annotations

import importlib

_EXPORTS = {"load_model": "services.model.checkpoint", "PRESETS": "services.model.config",
            "Grok1Config": "services.model.config", "get_preset": "services.model.config",
            "Grok1": "services.model.grok1"}

__all__ = ["PRESETS", "Grok1", "Grok1Config", "get_preset", "load_model"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
