"""Configuration: the YAML file, overrides, validation, and what the Serve deployments are given."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from services.cli import add_up_parser, config_from_args
from services.gateway.config import AppConfig, AutoscalingConfig, config_from_dict, load_config

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "local-cpu.yaml"


def test_the_local_cpu_file_is_the_defaults():
    config = load_config(DEPLOY)
    assert config.engine.model == "tiny" and config.host == "127.0.0.1" and config.port == 8000
    assert config.model_name == "tiny" and config.grpc_port is None
    assert config.engine.parallel_size == 1 and config.engine_deployment.autoscaling is None
    assert not config.auth.enabled and config.auth.open_health and config.auth.open_metrics


def test_overrides_dotted_nested_and_from_strings(tmp_path):
    config = load_config(DEPLOY, {"port": "8123", "engine.max_model_len": "512", "auth.open_metrics": "false",
                                  "engine_deployment": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}},
                                  "chat_template_stop": ["\nQ:"]})
    assert config.port == 8123 and config.engine.max_model_len == 512 and not config.auth.open_metrics
    assert config.engine.dtype == "float32"  # untouched options keep the file's values
    assert config.engine_deployment.autoscaling == AutoscalingConfig(min_replicas=1, max_replicas=3)
    assert config.chat_template_stop == ("\nQ:",)
    assert load_config(None, {"engine.max_model_len": "null"}).engine.max_model_len is None


@pytest.mark.parametrize("data, message", [
    ({"prot": 1}, "unknown option"),
    ({"engine": {"max_modle_len": 5}}, "engine.max_modle_len"),
    ({"port": 70000}, "port"),
    ({"port": "eighty"}, "port"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"engine": {"dtype": "int4"}}, "dtype"),
    ({"auth": {"open_health": "maybe"}}, "open_health"),
    ({"auth": {"api_key_env": ""}}, "api_key_env"),
    ({"engine_deployment": {"max_queued_requests": 0}}, "max_queued_requests"),
    ({"engine_deployment": {"parallel_size": 0}}, "parallel_size"),
    ({"engine_deployment": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}, "max_replicas"),
    ({"engine_deployment": {"autoscaling": {"target_ongoing_requests": 0}}}, "target_ongoing_requests"),
    ({"gateway_deployment": {"num_cpus": -1}}, "num_cpus"),
    ({"chat_template_stop": [""]}, "chat_template_stop"),
    ({"engine": "tiny"}, "engine"),
    ({"engine": {"backend": "tgi"}}, "backend must be one of"),
    ({"engine": {"backend": "vllm", "parallel_size": 2}}, "parallel_size must be 1"),
])
def test_invalid_options_name_themselves(data, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(data)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        AppConfig().port = 1  # type: ignore[misc]


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(listing)


def test_up_flags_override_the_file():
    parser = argparse.ArgumentParser()
    add_up_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["up", "--config", str(DEPLOY), "--port", "9001", "--model", "cpu-bench",
                              "--api-key-env", "MY_KEYS", "--no-open-metrics", "--max-queued-requests", "8",
                              "--engine", "vllm"])
    config = config_from_args(args)
    assert config.port == 9001 and config.engine.model == "cpu-bench" and config.auth.api_key_env == "MY_KEYS"
    assert not config.auth.open_metrics and config.auth.open_health
    assert config.engine_deployment.max_queued_requests == 8 and config.engine.backend == "vllm"
    assert config_from_args(parser.parse_args(["up"])) == AppConfig()


def test_deployment_options():
    serve_app = pytest.importorskip("services.serve_app")
    config = load_config(DEPLOY, {"engine": {"parallel_size": 2},
                                  "engine_deployment": {"num_gpus": 1, "max_queued_requests": 3,
                                                        "autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                                                        "target_ongoing_requests": 8}}})
    options = serve_app.engine_options(config)
    assert options["max_queued_requests"] == 3 and "num_replicas" not in options
    assert options["autoscaling_config"]["max_replicas"] == 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["placement_group_bundles"] == [{"CPU": 1, "GPU": 1}] * 2
    single = serve_app.engine_options(load_config(DEPLOY))
    assert single["num_replicas"] == 1 and "placement_group_bundles" not in single
    assert serve_app.gateway_options(load_config(DEPLOY))["ray_actor_options"] == {"num_cpus": 0.1}
    app = serve_app.build_app({"config": str(DEPLOY), "engine.max_model_len": "512", "port": "8100"})
    assert type(app).__name__ == "Application"
