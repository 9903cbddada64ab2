"""Configuration of the served application: frozen dataclasses, validated where they are made.

One `AppConfig` describes everything `grok-serve up` and `build_app` start: the engine (an
`EngineConfig`), the two Ray Serve deployments, authentication, limits and the HTTP address. It is read
from a YAML file (deploy/local-cpu.yaml) and/or a mapping of overrides whose keys may be dotted paths
("engine.max_model_len") or nested mappings. Unknown keys are errors, so a misspelt option is never
silently ignored. Values given as strings (`serve run ... key=value` passes every argument that way)
are converted to the field's type.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from services.config_checks import ConfigError, non_negative_number, positive_int
from services.engine.api import RequestLimits
from services.engine.config import EngineConfig


def _bool(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{owner}.{name} must be true or false, got {value!r}")


def _port(owner: str, name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigError(f"{owner}.{name} must be a TCP port in [0, 65535], got {value!r}")


@dataclass(frozen=True)
class AuthConfig:
    """Where API keys come from. No source at all means no authentication (a local default)."""

    api_key_env: str | None = None  # name of an environment variable holding comma-separated keys
    api_key_file: str | None = None  # a file with one key per line ('#' starts a comment)
    # Probes and Prometheus usually cannot hold a key; both may be opened explicitly.
    open_health: bool = True
    open_metrics: bool = True

    def __post_init__(self) -> None:
        for name in ("api_key_env", "api_key_file"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"auth.{name} must be a non-empty string or null, got {value!r}")
        _bool("auth", "open_health", self.open_health)
        _bool("auth", "open_metrics", self.open_metrics)

    @property
    def enabled(self) -> bool:
        return self.api_key_env is not None or self.api_key_file is not None


# An origin as browsers send it: scheme://host[:port], no path and no trailing slash.
_ORIGIN = re.compile(r"https?://[^/\s:]+(:[0-9]{1,5})?")
_HTTP_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _names(owner: str, name: str, value: object) -> tuple[str, ...]:
    """A list of strings; one string may hold several, separated by commas (`key=value` overrides)."""
    if isinstance(value, str):
        value = tuple(v.strip() for v in value.split(",") if v.strip())
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{owner}.{name} must be a list of non-empty strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class CorsConfig:
    """Cross-origin requests from browsers (a web playground on another origin). Off unless
    `allowed_origins` names at least one origin; "*" allows any. Methods and headers a browser may use
    are checked in its preflight; "*" allows any."""

    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("GET", "POST")
    # Client libraries send headers of their own (the openai package its x-stainless-*): any by default.
    allowed_headers: tuple[str, ...] = ("*",)
    # Cookies and HTTP auth from the browser; API keys in Authorization need no credentials mode.
    allow_credentials: bool = False
    max_age_s: int = 600  # how long a browser may cache a preflight answer

    def __post_init__(self) -> None:
        for name in ("allowed_origins", "allowed_methods", "allowed_headers"):
            object.__setattr__(self, name, _names("cors", name, getattr(self, name)))
        for origin in self.allowed_origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ConfigError(f"cors.allowed_origins: {origin!r} is not an origin such as "
                                  f"'https://example.com' or 'http://localhost:3000' (no path, no trailing /)")
        for name in ("allowed_methods", "allowed_headers"):
            bad = next((v for v in getattr(self, name) if v != "*" and not _HTTP_TOKEN.fullmatch(v)), None)
            if bad is not None:
                raise ConfigError(f"cors.{name}: {bad!r} is not a method or header name")
        _bool("cors", "allow_credentials", self.allow_credentials)
        if self.allow_credentials and "*" in self.allowed_origins:
            raise ConfigError("cors.allow_credentials needs the allowed origins listed: browsers refuse "
                              "credentials with a wildcard origin")
        if isinstance(self.max_age_s, bool) or not isinstance(self.max_age_s, int) or self.max_age_s < 0:
            raise ConfigError(f"cors.max_age_s must be an integer >= 0, got {self.max_age_s!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.allowed_origins)


@dataclass(frozen=True)
class AutoscalingConfig:
    """Ray Serve autoscaling of engine replicas, driven by ongoing requests per replica."""

    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 32.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    # The window Serve averages ongoing requests over: longer than the 10 s between callers' reports.
    look_back_period_s: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.min_replicas, bool) or not isinstance(self.min_replicas, int) \
                or self.min_replicas < 0:
            raise ConfigError(f"autoscaling.min_replicas must be an integer >= 0, got {self.min_replicas!r}")
        positive_int("autoscaling", "max_replicas", self.max_replicas)
        if self.max_replicas < self.min_replicas:
            raise ConfigError(f"autoscaling.max_replicas ({self.max_replicas}) is below min_replicas "
                             f"({self.min_replicas})")
        initial = self.initial_replicas
        if initial is not None and (isinstance(initial, bool) or not isinstance(initial, int)
                                    or not self.min_replicas <= initial <= self.max_replicas):
            raise ConfigError(f"autoscaling.initial_replicas must be in [min_replicas, max_replicas], "
                              f"got {initial!r}")
        non_negative_number("autoscaling", "target_ongoing_requests", self.target_ongoing_requests,
                             positive=True)
        non_negative_number("autoscaling", "upscale_delay_s", self.upscale_delay_s)
        non_negative_number("autoscaling", "downscale_delay_s", self.downscale_delay_s)
        non_negative_number("autoscaling", "look_back_period_s", self.look_back_period_s, positive=True)
        if self.look_back_period_s <= 10:
            raise ConfigError(f"autoscaling.look_back_period_s must exceed Serve's 10 s reporting interval, "
                              f"got {self.look_back_period_s!r}")

    def to_serve(self) -> dict[str, Any]:
        out = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
               "target_ongoing_requests": self.target_ongoing_requests,
               "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
               "look_back_period_s": self.look_back_period_s}
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        return out


@dataclass(frozen=True)
class EngineDeploymentConfig:
    """The engine deployment: one replica is one model instance (one parallel group)."""

    num_replicas: int = 1  # ignored when autoscaling is set
    autoscaling: AutoscalingConfig | None = None
    # The ranks of one model instance are `engine.parallel_size`: above 1 the deployment reserves a
    # placement group (engine.placement_strategy) of that many bundles. Files written for older versions repeat it
    # here; it is accepted when it agrees.
    parallel_size: int | None = None
    num_cpus: float = 1.0  # per rank
    num_gpus: float = 0.0  # per rank
    # At most this many replicas on one Ray node (1: each on a node of its own, so a node's loss takes
    # one replica); null: Serve spreads them as it can. With engine.parallel_size > 1 the ranks'
    # bundles decide instead (Serve refuses both at once): see engine.placement_strategy.
    max_replicas_per_node: int | None = None
    # A rollout (new options or code) may start this many percent more replicas than configured, so the
    # new ones serve before the old ones stop; 0 (Serve's default) stops old ones first.
    max_surge_percent: int = 0
    # The engine batches continuously, so many requests are "ongoing" in one replica at once; beyond
    # this they wait in the caller's queue, and beyond max_queued_requests they are refused (429).
    max_ongoing_requests: int = 64
    max_queued_requests: int = 256  # -1: unbounded
    # In-flight streams get this long to finish when a replica is stopped (scale-down, redeploy).
    graceful_shutdown_timeout_s: float = 30.0
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        owner = "engine_deployment"
        positive_int(owner, "num_replicas", self.num_replicas)
        positive_int(owner, "parallel_size", self.parallel_size, allow_none=True)
        positive_int(owner, "max_replicas_per_node", self.max_replicas_per_node, allow_none=True)
        if isinstance(self.max_surge_percent, bool) or not isinstance(self.max_surge_percent, int) \
                or not 0 <= self.max_surge_percent <= 100:
            raise ConfigError(f"{owner}.max_surge_percent must be an integer in [0, 100], got {self.max_surge_percent!r}")
        non_negative_number(owner, "num_cpus", self.num_cpus)
        non_negative_number(owner, "num_gpus", self.num_gpus)
        positive_int(owner, "max_ongoing_requests", self.max_ongoing_requests)
        if isinstance(self.max_queued_requests, bool) or not isinstance(self.max_queued_requests, int) \
                or not (self.max_queued_requests == -1 or self.max_queued_requests >= 1):
            raise ConfigError(f"{owner}.max_queued_requests must be -1 (unbounded) or a positive integer, "
                             f"got {self.max_queued_requests!r}")
        for name in ("graceful_shutdown_timeout_s", "health_check_period_s", "health_check_timeout_s"):
            non_negative_number(owner, name, getattr(self, name), positive=True)
        if self.autoscaling is not None and not isinstance(self.autoscaling, AutoscalingConfig):
            raise ConfigError(f"{owner}.autoscaling must be a mapping or null")


@dataclass(frozen=True)
class GatewayDeploymentConfig:
    """The HTTP ingress deployment: light, CPU only; it tokenizes and streams."""

    num_replicas: int = 1
    num_cpus: float = 0.1
    max_ongoing_requests: int = 1024
    graceful_shutdown_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        owner = "gateway_deployment"
        positive_int(owner, "num_replicas", self.num_replicas)
        non_negative_number(owner, "num_cpus", self.num_cpus)
        positive_int(owner, "max_ongoing_requests", self.max_ongoing_requests)
        non_negative_number(owner, "graceful_shutdown_timeout_s", self.graceful_shutdown_timeout_s,
                             positive=True)


@dataclass(frozen=True)
class GrpcConfig:
    """Connection lifetimes of the gRPC front end, so that idle and half-dead connections are closed.

    The server pings a connection idle for `keepalive_time_s` and drops it when the ping is not answered
    within `keepalive_timeout_s`; a connection with no call for `max_connection_idle_s` is closed; one
    older than `max_connection_age_s` (null: no limit) is asked to reconnect and gets
    `max_connection_age_grace_s` to finish its calls. `min_ping_interval_s` is the most often a client
    may ping without a call."""

    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    max_connection_idle_s: float = 600.0
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 60.0
    min_ping_interval_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("keepalive_time_s", "keepalive_timeout_s", "max_connection_idle_s",
                     "max_connection_age_grace_s", "min_ping_interval_s"):
            non_negative_number("grpc", name, getattr(self, name), positive=True)
        if self.max_connection_age_s is not None:
            non_negative_number("grpc", "max_connection_age_s", self.max_connection_age_s, positive=True)


@dataclass(frozen=True)
class AppConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    served_model_name: str | None = None  # default: `engine.model` as given
    chat_template: str | None = None  # a Jinja2 file; default: the built-in base-model transcript
    # Stop strings to apply with a user chat template (the built-in one brings its own).
    chat_template_stop: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int | None = None  # gRPC front end beside HTTP; off by default
    max_body_bytes: int = 1 << 20
    # A client that has not sent the next piece of its body within this long gets 408, so slow bodies
    # cannot hold connections and gateway tasks open indefinitely.
    body_read_timeout_s: float = 30.0
    # The same for a request's headers, in Ray Serve's HTTP proxy (services/gateway/header_timeout.py):
    # 408 and the connection closed when they are not all read this long after it opened.
    header_read_timeout_s: float = 30.0
    # Idle keep-alive connections of Ray Serve's HTTP proxy are closed after this (`grok-serve up`).
    keep_alive_timeout_s: int = 5
    limits: RequestLimits = field(default_factory=RequestLimits)
    grpc: GrpcConfig = field(default_factory=GrpcConfig)
    retry_after_s: int = 1  # the Retry-After a 429 carries
    engine_call_timeout_s: float = 10.0  # health checks and metric snapshots
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors: CorsConfig = field(default_factory=CorsConfig)
    engine_deployment: EngineDeploymentConfig = field(default_factory=EngineDeploymentConfig)
    gateway_deployment: GatewayDeploymentConfig = field(default_factory=GatewayDeploymentConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.engine, EngineConfig):
            raise ConfigError("engine must be a mapping of engine options")
        ranks = self.engine_deployment.parallel_size
        if ranks is not None and ranks != self.engine.parallel_size:
            raise ConfigError(f"engine_deployment.parallel_size ({ranks}) disagrees with engine.parallel_size "
                              f"({self.engine.parallel_size}); set engine.parallel_size only")
        if self.engine_deployment.max_replicas_per_node is not None and self.engine.parallel_size > 1:
            raise ConfigError("engine_deployment.max_replicas_per_node applies to one-rank replicas only: with "
                              "engine.parallel_size > 1 the placement group decides (engine.placement_strategy)")
        if self.served_model_name is not None and (not isinstance(self.served_model_name, str)
                                                   or not self.served_model_name.strip()):
            raise ConfigError(f"served_model_name must be a non-empty string or null, "
                             f"got {self.served_model_name!r}")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ConfigError(f"chat_template must be a file path or null, got {self.chat_template!r}")
        stop = self.chat_template_stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ConfigError(f"chat_template_stop must be a list of non-empty strings, got {stop!r}")
        object.__setattr__(self, "chat_template_stop", tuple(stop))
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError(f"host must be a non-empty string, got {self.host!r}")
        _port("app", "port", self.port)
        _port("app", "grpc_port", self.grpc_port, allow_none=True)
        positive_int("app", "max_body_bytes", self.max_body_bytes)
        non_negative_number("app", "body_read_timeout_s", self.body_read_timeout_s, positive=True)
        non_negative_number("app", "header_read_timeout_s", self.header_read_timeout_s, positive=True)
        positive_int("app", "keep_alive_timeout_s", self.keep_alive_timeout_s)
        if not isinstance(self.limits, RequestLimits):
            raise ConfigError("limits must be a mapping of request limits")
        if not isinstance(self.grpc, GrpcConfig):
            raise ConfigError("grpc must be a mapping of gRPC connection settings")
        if not isinstance(self.cors, CorsConfig):
            raise ConfigError("cors must be a mapping of CORS settings")
        positive_int("app", "retry_after_s", self.retry_after_s)
        non_negative_number("app", "engine_call_timeout_s", self.engine_call_timeout_s, positive=True)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.engine.model


# --- reading ---------------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    module = __import__(cls.__module__, fromlist=["_"])
    return typing.get_type_hints(cls, vars(module))


def _options(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _from_string(text: str, hint: Any) -> Any:
    """A string from a command line, read as the field's type when it is not a str field."""
    options = _options(hint)
    if str in options:
        return text
    if type(None) in options and text.strip().lower() in ("none", "null", ""):
        return None
    if bool in options and text.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return text.strip().lower() in ("true", "yes", "1")
    for kind in (int, float):
        if kind in options:
            try:
                return kind(text)
            except ValueError:
                pass
    return text  # left for __post_init__ to reject with the field's name


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'the configuration'} must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(where + k for k in unknown)}; "
                         f"known: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        nested = next((t for t in _options(hint) if dataclasses.is_dataclass(t)), None)
        if nested is not None and isinstance(value, Mapping):
            value = _build(nested, value, f"{where}{name}.")
        elif isinstance(value, str):
            value = _from_string(value, hint)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where or 'configuration'}: {exc}") from None


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        head, _, rest = str(key).partition(".")
        if rest:
            value = {rest: value}
        if isinstance(value, Mapping) and isinstance(out.get(head), Mapping):
            out[head] = _merge(out[head], value)
        elif isinstance(value, Mapping):
            out[head] = _merge({}, value)
        else:
            out[head] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None) -> AppConfig:
    """The file's options (if any), then `overrides` on top (dotted keys or nested mappings)."""
    data = read_yaml(path) if path is not None else {}
    data = _merge(data, overrides or {})
    return config_from_dict(data)


def config_from_dict(data: Mapping[str, Any]) -> AppConfig:
    return _build(AppConfig, data, "")


def config_to_dict(config: AppConfig) -> dict[str, Any]:
    """Plain data (for printing and for a Serve config file's `args`)."""
    return dataclasses.asdict(config)
