"""What the HTTP routes share: one `GatewayContext` per app, and the engine requests they make."""
from __future__ import annotations

from dataclasses import dataclass

from services.engine.api import EngineClient, ModelInfo
from services.engine.sampling_params import SamplingParams
from services.gateway.auth import ApiKeys
from services.gateway.config import AppConfig
from services.gateway.metrics import GatewayMetrics
from services.model.chat_template import ChatTemplate
from services.model.tokenizer import Tokenizer


@dataclass(frozen=True)
class GenerationJob:
    """One prompt of an API request = one engine request (with params.n sequences)."""

    first_index: int  # the API choice index of its sequence 0
    prompt_ids: list[int]
    prompt_text: str | None
    params: SamplingParams
    engine_id: str


@dataclass(frozen=True)
class GatewayContext:
    """Everything the routes use; one per app."""

    config: AppConfig
    model: ModelInfo
    tokenizer: Tokenizer
    template: ChatTemplate
    keys: ApiKeys
    engine: EngineClient
    metrics: GatewayMetrics

    @property
    def model_name(self) -> str:
        return self.config.model_name


def build_context(config: AppConfig, engine: EngineClient, keys: ApiKeys | None = None) -> GatewayContext:
    template = (ChatTemplate.from_file(config.chat_template, stop=config.chat_template_stop)
                if config.chat_template else ChatTemplate.default())
    return GatewayContext(config, engine.model_info, engine.tokenizer, template,
                          keys if keys is not None else ApiKeys.from_config(config.auth), engine,
                          GatewayMetrics(config.model_name))
