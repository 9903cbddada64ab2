"""Placement options without a cluster: validation, what the Serve deployment is given, the command line.
The multi-node behaviour they produce is tested on a local 3-node Ray cluster (tests/test_multinode.py)."""
from __future__ import annotations

import argparse
import socket

import pytest

from services.cli import add_up_parser, config_from_args
from services.engine.config import PLACEMENT_STRATEGIES, EngineConfig
from services.engine.parallel import local_address
from services.gateway.config import AutoscalingConfig, config_from_dict, load_config


@pytest.mark.parametrize("data, message", [
    ({"engine": {"placement_strategy": "strict_pack"}}, "engine.placement_strategy must be one of"),
    ({"engine": {"placement_strategy": "ANYWHERE"}}, "engine.placement_strategy must be one of"),
    ({"engine_deployment": {"max_replicas_per_node": 0}}, "max_replicas_per_node must be a positive"),
    ({"engine_deployment": {"max_replicas_per_node": True}}, "max_replicas_per_node must be a positive"),
    ({"engine": {"parallel_size": 2}, "engine_deployment": {"max_replicas_per_node": 1}},
     "max_replicas_per_node applies to one-rank replicas only"),
    ({"engine_deployment": {"autoscaling": {"look_back_period_s": 0}}}, "look_back_period_s"),
    ({"engine_deployment": {"autoscaling": {"look_back_period_s": 10}}}, "exceed Serve's 10 s reporting"),
    ({"engine_deployment": {"max_surge_percent": 101}}, "max_surge_percent must be an integer in"),
])
def test_bad_placement_options_name_themselves(data, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(data)


def test_strict_pack_is_the_default():
    assert EngineConfig().placement_strategy == "STRICT_PACK"
    assert load_config(None).engine_deployment.max_replicas_per_node is None


def test_replicas_spread_over_nodes():
    serve_app = pytest.importorskip("services.serve_app")
    options = serve_app.engine_options(load_config(None, {"engine_deployment": {
        "num_replicas": 2, "max_replicas_per_node": 1}}))
    assert options["max_replicas_per_node"] == 1 and options["num_replicas"] == 2
    assert options["max_surge_percent"] == 0
    assert "placement_group_bundles" not in options
    assert "max_replicas_per_node" not in serve_app.engine_options(load_config(None))


@pytest.mark.parametrize("strategy", PLACEMENT_STRATEGIES)
def test_a_parallel_group_takes_the_configured_strategy(strategy):
    serve_app = pytest.importorskip("services.serve_app")
    config = load_config(None, {"engine": {"parallel_size": 2, "placement_strategy": strategy},
                                "engine_deployment": {"num_cpus": 0.5}})
    options = serve_app.engine_options(config)
    assert options["placement_group_strategy"] == strategy
    assert options["placement_group_bundles"] == [{"CPU": 0.5, "GPU": 0.0}] * 2
    assert "max_replicas_per_node" not in options


def test_serve_accepts_the_options_it_is_given():
    # Ray's own validation of the deployment options (max_replicas_per_node and placement groups
    # together would be refused here, which the config prevents).
    serve_app = pytest.importorskip("services.serve_app")
    for overrides in ({"engine_deployment": {"num_replicas": 2, "max_replicas_per_node": 1, "max_surge_percent": 50}},
                      {"engine": {"parallel_size": 2, "placement_strategy": "STRICT_SPREAD"}}):
        app = serve_app.build_application(load_config(None, overrides))
        assert type(app).__name__ == "Application"


def test_autoscaling_windows_reach_serve():
    scaling = AutoscalingConfig(min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                                look_back_period_s=12)
    out = scaling.to_serve()
    assert out["look_back_period_s"] == 12
    from ray.serve.config import AutoscalingConfig as ServeAutoscaling

    ServeAutoscaling(**out)  # Serve's schema accepts every key


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    add_up_parser(parser.add_subparsers(dest="command"))
    config = config_from_args(parser.parse_args(["up", "--parallel-size", "2", "--placement-strategy", "PACK"]))
    assert config.engine.parallel_size == 2 and config.engine.placement_strategy == "PACK"
    config = config_from_args(parser.parse_args(["up", "--num-replicas", "2", "--max-replicas-per-node", "1"]))
    assert config.engine_deployment.max_replicas_per_node == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["up", "--placement-strategy", "ANYWHERE"])


def test_ranks_bind_their_own_address_on_the_route_to_rank_0():
    assert local_address("127.0.0.1") == "127.0.0.1"
    # A peer on another node: the address of this host's interface towards it, one this host can bind.
    here = local_address("192.0.2.1")
    with socket.socket() as sock:
        sock.bind((here, 0))
