"""load_format="grok1": weights through services.model's loader, streamed tensor by tensor."""
from __future__ import annotations

from services.model.checkpoint import load_weights, resolve_source
from services.vllm_plugin.names import FORMAT


def register_loader() -> None:
    from torch import nn
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    if FORMAT in _LOAD_FORMAT_TO_MODEL_LOADER:
        return

    @register_model_loader(FORMAT)
    class Grok1ModelLoader(BaseModelLoader):
        def download_model(self, model_config) -> None:
            # Checkpoints are local directories: nothing is fetched from a model hub.
            resolve_source(model_config.model)

        def load_weights(self, model: nn.Module, model_config) -> None:
            grok = getattr(model, "model", None)
            if grok is None or not hasattr(grok, "shard"):
                raise ValueError(f"load_format={FORMAT!r} loads Grok-1 only, not {type(model).__name__}")
            _, path, load_format = resolve_source(model_config.model)
            load_weights(grok, path, load_format)
            if grok.in_out_embed.embeddings.device.type == "cpu":
                grok.store_experts_out_in()
