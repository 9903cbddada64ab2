"""The names the plugin registers with vLLM (a leaf module: the package and its parts all read them)."""
from __future__ import annotations

ARCHITECTURE = "Grok1ForCausalLM"
FORMAT = "grok1"  # both the config format and the load format the plugin registers
