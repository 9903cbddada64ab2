"""The Grok-1 model: config and presets, the PyTorch model, checkpoint loaders, tokenizer."""
from services.model.checkpoint import load_model
from services.model.config import PRESETS, Grok1Config, get_preset
from services.model.grok1 import Grok1

__all__ = ["PRESETS", "Grok1", "Grok1Config", "get_preset", "load_model"]
