"""Tests for rendering a pool's children: schema-valid for Kubernetes 1.37, owned, labelled, configured."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from loraplex_api import SharedBasePool
from loraplex_api.pool import ServingSpec
from loraplex_api.wire import HEALTH_PORT, METRICS_PORT
from loraplex_operator.render import (
    RenderError,
    render_children,
    render_headless_service,
    render_metrics_service,
    render_promoted_configmap,
    render_statefulset,
    selector_string,
)
from loraplex_operator.render_serving import render_serving, serving_endpoint

K8S_VERSION = "1.37.0"


def make_pool(**spec: Any) -> SharedBasePool:
    base: dict[str, Any] = {"model": {"name": "smollm2", "uri": "builtin://smollm2-135m-instruct"}}
    base.update(spec)
    return SharedBasePool.model_validate(
        {
            "apiVersion": "loraplex.dev/v1alpha1",
            "kind": "SharedBasePool",
            "metadata": {"name": "smol", "namespace": "team-a", "uid": "uid-1", "generation": 1},
            "spec": base,
        }
    )


def full_pool() -> SharedBasePool:
    return make_pool(
        model={"name": "llama", "uri": "pvc://models/llama-3-8b", "dtype": "bfloat16"},
        replicas=3,
        trainer={
            "image": "registry.example/trainer:1.2",
            "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "64Gi"}, "requests": {"cpu": "8"}},
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {
                            "weight": 100,
                            "podAffinityTerm": {
                                "topologyKey": "kubernetes.io/hostname",
                                "labelSelector": {"matchLabels": {"loraplex.dev/pool": "smol"}},
                            },
                        }
                    ]
                }
            },
            "env": [
                {"name": "NCCL_DEBUG", "value": "WARN"},
                {"name": "POD_NAME", "value": "shadowed"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            ],
            "serviceAccountName": "trainer-sa",
            "priorityClassName": "training",
        },
        storage={"claimName": "shared-rwx", "subPath": "team-a/smol"},
    )


def container(sts: dict[str, Any]) -> dict[str, Any]:
    return sts["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize(
    "pool", [make_pool(), full_pool(), make_pool(model={"name": "q", "uri": "hf://Qwen/Qwen3-0.6B"})]
)
def test_every_child_is_a_valid_kubernetes_object(pool: SharedBasePool) -> None:
    children = [*render_children(pool), render_promoted_configmap(pool, {"exp-a": "file:///ckpt/a"})]
    for child in children:
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_children_are_owned_by_the_pool_and_labelled() -> None:
    pool = make_pool()
    for child in [*render_children(pool), render_promoted_configmap(pool, {})]:
        meta = child["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "loraplex.dev/v1alpha1",
                "kind": "SharedBasePool",
                "name": "smol",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["loraplex.dev/pool"] == "smol"
        assert meta["labels"]["app.kubernetes.io/part-of"] == "loraplex"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "loraplex-operator"


def test_statefulset_follows_the_trainer_spec() -> None:
    sts = render_statefulset(full_pool())
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    c = container(sts)
    assert sts["metadata"]["name"] == "smol"
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["serviceName"] == "smol-headless"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert c["image"] == "registry.example/trainer:1.2"
    assert c["args"][:2] == ["loraplex", "agent"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": 1, "memory": "64Gi"}, "requests": {"cpu": "8"}}
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "podAntiAffinity" in pod["affinity"]
    assert pod["serviceAccountName"] == "trainer-sa"
    assert pod["priorityClassName"] == "training"


def test_pod_identity_env_cannot_be_shadowed() -> None:
    env = container(render_statefulset(full_pool()))["env"]
    by_name = {e["name"]: e for e in env}
    assert [e["name"] for e in env].count("POD_NAME") == 1
    assert by_name["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert by_name["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert by_name["LORAPLEX_POOL"]["value"] == "smol"
    # Tenants share the pod: a reward worker that cannot be confined must not run.
    assert by_name["LORAPLEX_REWARD_CONFINEMENT"]["value"] == "required"
    assert by_name["NCCL_DEBUG"]["value"] == "WARN"
    assert by_name["TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "s", "key": "k"}


def test_probes_ports_and_security() -> None:
    sts = render_statefulset(make_pool())
    c = container(sts)
    pod = sts["spec"]["template"]["spec"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {
        "health": HEALTH_PORT,
        "metrics": METRICS_PORT,
    }
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]


def test_storage_claim_with_sub_path_and_pvc_model() -> None:
    sts = render_statefulset(full_pool())
    pod = sts["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in container(sts)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["storage"] == {"name": "storage", "persistentVolumeClaim": {"claimName": "shared-rwx"}}
    assert mounts["storage"]["subPath"] == "team-a/smol"
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert mounts["model"] == {"name": "model", "mountPath": "/models/models", "readOnly": True}
    env = {e["name"]: e.get("value") for e in container(sts)["env"]}
    assert env["LORAPLEX_MODEL_URI"] == "file:///models/models/llama-3-8b"


def test_without_storage_claim_checkpoints_go_to_an_empty_dir() -> None:
    pod = render_statefulset(make_pool())["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["storage"] == {"name": "storage", "emptyDir": {}}
    assert "model" not in volumes


def test_hf_model_downloads_into_a_hugging_face_cache_with_the_token_from_a_secret() -> None:
    sts = render_statefulset(make_pool(model={"name": "q", "uri": "hf://Qwen/Qwen3-0.6B"}))
    env = {e["name"]: e.get("value") for e in container(sts)["env"]}
    mounts = {m["mountPath"]: m for m in container(sts)["volumeMounts"]}
    assert env["HF_HOME"] == "/var/cache/huggingface"
    assert "HF_HUB_OFFLINE" not in env and "HF_TOKEN" not in env
    assert mounts["/var/cache/huggingface"]["name"] == "hf-cache"

    gated = {"name": "l", "uri": "hf://meta-llama/Llama-3.2-1B", "tokenSecretRef": {"name": "hf"}}
    env_list = container(render_statefulset(make_pool(model=gated)))["env"]
    token = next(e for e in env_list if e["name"] == "HF_TOKEN")
    assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}

    shared = make_pool(model={"name": "q", "uri": "hf://Qwen/Qwen3-0.6B"}, storage={"claimName": "rwx"})
    mounts = {m["mountPath"]: m for m in container(render_statefulset(shared))["volumeMounts"]}
    assert mounts["/var/cache/huggingface"] == {
        "name": "storage",
        "mountPath": "/var/cache/huggingface",
        "subPath": "huggingface",
    }


def test_suspended_pool_scales_to_zero_but_keeps_its_spec() -> None:
    pool = make_pool(replicas=4, suspend=True)
    assert render_statefulset(pool)["spec"]["replicas"] == 0
    assert pool.spec.replicas == 4


def test_default_service_account_applies_only_when_the_pool_names_none() -> None:
    plain = render_statefulset(make_pool(), default_service_account="loraplex-trainer")
    assert plain["spec"]["template"]["spec"]["serviceAccountName"] == "loraplex-trainer"
    named = render_statefulset(full_pool(), default_service_account="loraplex-trainer")
    assert named["spec"]["template"]["spec"]["serviceAccountName"] == "trainer-sa"


def test_services_select_the_trainer_pods() -> None:
    pool = make_pool()
    headless = render_headless_service(pool)
    metrics = render_metrics_service(pool)
    pod_labels = render_statefulset(pool)["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert metrics["spec"]["ports"][0]["port"] == METRICS_PORT
    for svc in (headless, metrics):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert selector_string("smol") == (
        "app.kubernetes.io/name=loraplex-trainer,app.kubernetes.io/instance=smol,loraplex.dev/pool=smol"
    )


def test_promoted_configmap_maps_adapter_names_to_uris() -> None:
    cm = render_promoted_configmap(make_pool(), {"b": "s3://x/b", "a": "file:///a"})
    assert cm["metadata"]["name"] == "smol-promoted-adapters"
    assert cm["data"] == {"a": "file:///a", "b": "s3://x/b"}


def test_a_name_too_long_for_statefulset_pods_is_refused_with_the_field() -> None:
    pool = make_pool()
    pool.metadata.name = "p" * 60
    with pytest.raises(RenderError, match=r"metadata.name: .* at most 52"):
        render_statefulset(pool)


def test_a_model_change_rolls_the_pods_and_nothing_else_does() -> None:
    def template_annotations(pool: SharedBasePool) -> dict[str, str]:
        return render_statefulset(pool)["spec"]["template"]["metadata"]["annotations"]

    base = template_annotations(make_pool())
    assert base == template_annotations(make_pool())  # stable: no roll without a change
    assert base == template_annotations(make_pool(replicas=3))  # scaling is not a roll
    model = {"name": "smollm2", "uri": "builtin://smollm2-135m-instruct"}
    for change in ({"dtype": "bfloat16"}, {"uri": "hf://org/other"}, {"revision": "v2"}):
        changed = template_annotations(make_pool(model={**model, **change}))
        assert changed["loraplex.dev/model-hash"] != base["loraplex.dev/model-hash"], change


def test_a_queue_name_puts_the_statefulset_and_its_pods_in_kueue() -> None:
    sts = render_statefulset(make_pool(trainer={"queueName": "team-a-gpus"}))
    assert sts["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert sts["spec"]["template"]["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    # The selector stays as it was: a label the selector does not name may change freely.
    assert "kueue.x-k8s.io/queue-name" not in sts["spec"]["selector"]["matchLabels"]
    plain = render_statefulset(make_pool())
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"]


def serving_pool(**serving: Any) -> SharedBasePool:
    pool = full_pool()
    spec = pool.spec.model_copy(update={"serving": ServingSpec.model_validate({"enabled": True, **serving})})
    return pool.model_copy(update={"spec": spec})


@pytest.mark.parametrize(
    "pool",
    [
        serving_pool(),
        serving_pool(
            replicas=2, image="registry.example/vllm:1", resources={"limits": {"nvidia.com/gpu": 1}},
            nodeSelector={"gpu": "l4"}, maxLoras=16, maxLoRARank=32, port=8080, args=["--max-model-len", "4096"],
        ),
        make_pool(
            model={"name": "Qwen/Qwen3-0.6B", "uri": "hf://Qwen/Qwen3-0.6B"},
            serving={"enabled": True},
            storage={"claimName": "shared"},
        ),
    ],
)  # fmt: skip
def test_the_serving_deployment_and_service_are_valid_kubernetes_objects(pool: SharedBasePool) -> None:
    for child in render_serving(pool):
        kubernetes_validate.validate(child, K8S_VERSION, strict=True)


def test_serving_runs_loraplex_serving_on_the_pools_model_with_storage_read_only() -> None:
    pool = serving_pool(maxLoras=16, port=8080, args=["--max-model-len", "4096"])
    deployment, service = render_serving(pool)
    for child in (deployment, service):
        assert child["metadata"]["name"] == "smol-serving"
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    pod = deployment["spec"]["template"]["spec"]
    serving = pod["containers"][0]
    assert serving["image"] == "registry.example/trainer:1.2"  # the trainer image has vLLM
    args = serving["args"]
    assert args[:2] == ["loraplex", "serving"]
    assert "--model-uri=file:///models/models/llama-3-8b" in args and "--model-name=llama" in args
    assert "--configmap=smol-promoted-adapters" in args and "--namespace=$(POD_NAMESPACE)" in args
    assert "--claim=shared-rwx=/var/lib/loraplex-claims/shared-rwx" in args
    assert "--max-loras=16" in args and "--max-lora-rank=64" in args and "--port=8080" in args
    assert args[-3:] == ["--", "--max-model-len", "4096"]
    storage = next(m for m in serving["volumeMounts"] if m["name"] == "storage")
    assert storage == {
        "name": "storage",
        "mountPath": "/var/lib/loraplex-claims/shared-rwx",
        "readOnly": True,
    }
    claim = next(v for v in pod["volumes"] if v["name"] == "storage")["persistentVolumeClaim"]
    assert claim == {"claimName": "shared-rwx", "readOnly": True}
    assert all(m.get("readOnly") for m in serving["volumeMounts"] if m["name"] in ("storage", "model"))
    assert serving["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert serving["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["serviceAccountName"] == "trainer-sa"  # without a serving identity: the trainers'
    served_as = render_serving(pool, service_account="loraplex-serving")[0]["spec"]["template"]["spec"]
    assert served_as["serviceAccountName"] == "loraplex-serving"
    env = {e["name"]: e for e in serving["env"]}
    assert env["NCCL_DEBUG"]["value"] == "WARN" and env["VLLM_NO_USAGE_STATS"]["value"] == "1"
    assert "LORAPLEX_SERVING_API_KEY" not in env
    keyed = serving_pool(apiKeySecretRef={"name": "serving-key", "key": "api-key"})
    keyed_env = {
        e["name"]: e for e in render_serving(keyed)[0]["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert keyed_env["LORAPLEX_SERVING_API_KEY"]["valueFrom"] == {
        "secretKeyRef": {"name": "serving-key", "key": "api-key"}
    }
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]


def test_serving_pods_are_selected_by_neither_the_trainer_services_nor_the_statefulset() -> None:
    pool = serving_pool()
    deployment, service = render_serving(pool)
    serving_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for child in render_children(pool):
        selector = child["spec"].get("selector")
        selector = selector.get("matchLabels", selector) if selector else {}
        assert not all(serving_labels.get(k) == v for k, v in selector.items()), child["metadata"]["name"]
    trainer_labels = render_children(pool)[0]["spec"]["template"]["metadata"]["labels"]
    assert not all(trainer_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert serving_endpoint(pool) == "http://smol-serving.team-a.svc:8000/v1"
