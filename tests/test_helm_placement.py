"""The chart's placement and scaling values: a replica spanning GPU pods, replicas spread over nodes, the
rollout surge and the autoscaling window reach the Serve config, the pods and the loader as tested on a
real multi-node cluster in tests/test_multinode.py."""
from __future__ import annotations

import pytest
import yaml

from tests.test_helm import (
    CHART,
    RELEASE,
    _merged,
    app_args,
    crd_validator,  # noqa: F401 - a fixture
    effective_config,
    gpu_group,
    helm,  # noqa: F401 - a fixture
    overrides,
    ray_container,
    rayservice,
    render,
    run_helm,
    serve_config,
)


def _gpus(docs) -> int:
    return int(ray_container(gpu_group(docs)["template"])["resources"]["limits"].get("nvidia.com/gpu", 0))


def _valid(docs, crd_validator) -> None:  # noqa: F811 - the fixture's value, passed on
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config(docs))
    errors = list(crd_validator.iter_errors(rayservice(docs)))
    assert not errors, [e.message for e in errors[:5]]


def test_defaults_keep_a_replica_on_one_pod(helm, crd_validator):  # noqa: F811
    docs = render(helm)
    config = effective_config(docs)
    assert config.engine.placement_strategy == "STRICT_PACK"
    assert config.engine_deployment.max_replicas_per_node is None
    assert config.engine_deployment.max_surge_percent == 0
    assert _gpus(docs) == config.engine.parallel_size  # one replica's GPUs, all on its pod
    assert gpu_group(docs)["replicas"] == config.engine_deployment.num_replicas
    _valid(docs, crd_validator)


def test_a_replica_spanning_two_pods(helm, crd_validator):  # noqa: F811
    docs = render(helm, "--set", "engine.placement.nodesPerReplica=2", "--set", "engine.replicas=2")
    config = effective_config(docs)
    assert config.engine.parallel_size == 8 and config.engine.placement_strategy == "PACK"
    workers = gpu_group(docs)
    # 8 ranks over 2 pods of 4 GPUs, 2 pods per replica.
    assert _gpus(docs) == 4
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    _valid(docs, crd_validator)
    docs = render(helm, "--set", "engine.placement.nodesPerReplica=2", "--set",
                  "engine.placement.strategy=STRICT_SPREAD")
    assert effective_config(docs).engine.placement_strategy == "STRICT_SPREAD"


def test_autoscaled_spanning_replicas_count_pods(helm):  # noqa: F811
    docs = render(helm, "--set", "engine.placement.nodesPerReplica=2", "--set", "engine.autoscaling.enabled=true",
                  "--set", "engine.autoscaling.minReplicas=1", "--set", "engine.autoscaling.maxReplicas=3")
    workers = gpu_group(docs)
    assert workers["minReplicas"] == 2 and workers["maxReplicas"] == 6


def test_one_rank_replicas_spread_over_nodes(helm, crd_validator):  # noqa: F811
    docs = render(helm, "-f", str(CHART / "values-cpu.yaml"), "--set", "engine.replicas=2",
                  "--set", "engine.placement.maxReplicasPerNode=1")
    config = effective_config(docs)
    assert config.engine.parallel_size == 1 and config.engine_deployment.max_replicas_per_node == 1
    assert app_args(docs)["engine_deployment"]["max_replicas_per_node"] == 1
    _valid(docs, crd_validator)


def test_surge_and_autoscaling_window_apply_in_place(helm):  # noqa: F811
    base = ["--set", "engine.autoscaling.enabled=true", "--set", "engine.autoscaling.targetOngoingRequests=64"]
    docs = render(helm, *base, "--set", "engine.maxSurgePercent=50", "--set", "engine.autoscaling.lookBackPeriodS=20")
    engine = overrides(docs)["GrokEngine"]
    assert engine["max_surge_percent"] == 50 and engine["autoscaling_config"]["look_back_period_s"] == 20
    config = effective_config(docs)
    assert config.engine_deployment.max_surge_percent == 50
    assert config.engine_deployment.autoscaling.look_back_period_s == 20
    assert config.engine_deployment.autoscaling.target_ongoing_requests == 64
    # Lightweight options: the application's arguments (which restart replicas) do not change.
    assert app_args(docs) == app_args(render(helm, *base))


BAD_VALUES = [
    ("nodes-per-replica-3", {"engine": {"placement": {"nodesPerReplica": 3}}}, "nodesPerReplica"),
    ("nodes-do-not-divide-ranks", {"engine": {"parallelSize": 2, "placement": {"nodesPerReplica": 4}}},
     "must divide engine.parallelSize"),
    ("strict-pack-over-two-pods", {"engine": {"placement": {"nodesPerReplica": 2, "strategy": "STRICT_PACK"}}},
     "STRICT_PACK keeps a replica on one node"),
    ("unknown-strategy", {"engine": {"placement": {"strategy": "ANYWHERE"}}}, "strategy"),
    ("replicas-per-node-with-a-group", {"engine": {"placement": {"maxReplicasPerNode": 1}}},
     "maxReplicasPerNode applies to one-rank replicas"),
    ("surge-over-100", {"engine": {"maxSurgePercent": 150}}, "maxSurgePercent"),
    ("look-back-within-reports", {"engine": {"autoscaling": {"lookBackPeriodS": 5}}}, "lookBackPeriodS"),
    ("pod-ceiling-below-spanning-replicas", {"engine": {"replicas": 2, "placement": {"nodesPerReplica": 2}},
                                             "worker": {"maxReplicas": 3}}, "worker.maxReplicas"),
]


@pytest.mark.parametrize("name,values,fragment", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_placement_values_are_refused(helm, tmp_path, name, values, fragment):  # noqa: F811
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_merged({"auth": {"apiKeys": ["test-key-0123456789"]}}, values)))
    done = run_helm(helm, "template", RELEASE, str(CHART), "-f", str(path))
    assert done.returncode != 0, f"{name}: rendered, but should have been refused"
    assert fragment in done.stderr, done.stderr
