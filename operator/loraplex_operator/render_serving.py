"""A pool's serving children: the Deployment running `loraplex serving` and its Service (spec.serving).

The pod runs vLLM behind loraplex's proxy (trainer/loraplex_trainer/serving/) with the pool's
base model; the pool's storage claim is mounted whole and read-only, since checkpoint URIs are
paths inside the claim. The trainer's pod pieces (volumes for the model and caches, the security
context) are shared with render.py.
"""

from __future__ import annotations

from typing import Any

from loraplex_api import SharedBasePool
from loraplex_api.wire import (
    MODEL_HASH_ANNOTATION,
    MODEL_URI_ENV,
    POD_NAMESPACE_ENV,
    POOL_LABEL,
    SERVING_API_KEY_ENV,
    promoted_configmap_name,
)

from .render import (
    CONTAINER_SECURITY,
    HF_CACHE_MOUNT,
    POD_SECURITY,
    RESERVED_ENV,
    check_renderable,
    model_hash,
    owner_reference,
    pod_volumes,
    probe,
)

SERVING_NAME = "loraplex-serving"
SERVING_CLAIM_MOUNT = "/var/lib/loraplex-claims"


def serving_name(pool: str) -> str:
    """The serving Deployment's and Service's name."""
    return f"{pool}-serving"


def serving_labels(pool: str) -> dict[str, str]:
    """Labels that select a pool's serving pods (not its trainer pods)."""
    return {"app.kubernetes.io/name": SERVING_NAME, "app.kubernetes.io/instance": pool, POOL_LABEL: pool}


def serving_endpoint(pool: SharedBasePool) -> str:
    """The OpenAI base URL of the pool's serving Service inside the cluster."""
    name = serving_name(pool.metadata.name)
    return f"http://{name}.{pool.metadata.namespace}.svc:{pool.spec.serving.port}/v1"


def _serving_metadata(pool: SharedBasePool) -> dict[str, Any]:
    labels = {
        **serving_labels(pool.metadata.name),
        "app.kubernetes.io/component": "serving",
        "app.kubernetes.io/part-of": "loraplex",
        "app.kubernetes.io/managed-by": "loraplex-operator",
    }
    return {
        "name": serving_name(pool.metadata.name),
        "namespace": pool.metadata.namespace,
        "labels": labels,
        "ownerReferences": [owner_reference(pool)],
    }


def render_serving(
    pool: SharedBasePool,
    *,
    service_account: str | None = None,
    default_service_account: str | None = None,
) -> list[dict[str, Any]]:
    """The serving Deployment and its Service: `loraplex serving` (vLLM behind a proxy), storage read-only.

    The process reads the promoted-adapters ConfigMap through the API (seconds after a change; a
    mounted ConfigMap would follow only at the kubelet's sync period). It runs as
    ``service_account`` (the chart's serving identity, which may only read ConfigMaps); without
    one, as the pool's trainers do.
    """
    check_renderable(pool)
    spec, serving = pool.spec, pool.spec.serving
    name = pool.metadata.name
    volumes, mounts, env = pod_volumes(pool)
    # The pool's storage, whole and read-only: checkpoint URIs are paths inside the claim.
    volumes = [v for v in volumes if v["name"] != "storage"]
    mounts = [m for m in mounts if m["name"] != "storage"]
    claims = []
    if spec.storage.claim_name:
        claim = spec.storage.claim_name
        volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "storage", "mountPath": f"{SERVING_CLAIM_MOUNT}/{claim}", "readOnly": True})
        claims = [f"--claim={claim}={SERVING_CLAIM_MOUNT}/{claim}"]
    if spec.model.uri.startswith("hf://") and not any(v["name"] == "hf-cache" for v in volumes):
        volumes.append({"name": "hf-cache", "emptyDir": {}})  # its own download: storage is read-only here
        mounts.append({"name": "hf-cache", "mountPath": HF_CACHE_MOUNT})
    model_uri = next((e["value"] for e in env if e["name"] == MODEL_URI_ENV), spec.model.uri)
    rank = serving.max_lora_rank or spec.capacity.max_lora_rank
    container: dict[str, Any] = {
        "name": "serving",
        "image": serving.image or spec.trainer.image,
        "imagePullPolicy": serving.image_pull_policy,
        "args": [
            "loraplex",
            "serving",
            f"--model-uri={model_uri}",
            f"--model-name={spec.model.name}",
            f"--namespace=$({POD_NAMESPACE_ENV})",
            f"--configmap={promoted_configmap_name(name)}",
            *claims,
            f"--port={serving.port}",
            f"--max-loras={serving.max_loras}",
            f"--max-lora-rank={rank}",
            f"--dtype={spec.model.dtype}",
            *(["--", *serving.args] if serving.args else []),
        ],  # fmt: skip
        "env": [
            # The user's env too (proxies, HF_ENDPOINT, MLFLOW_...), then what loraplex sets.
            *(e.wire() for e in spec.trainer.env if e.name not in RESERVED_ENV),
            *env,
            {"name": POD_NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "DO_NOT_TRACK", "value": "1"},
            *(
                [
                    {
                        "name": SERVING_API_KEY_ENV,
                        "valueFrom": {"secretKeyRef": serving.api_key_secret_ref.wire()},
                    }
                ]
                if serving.api_key_secret_ref is not None
                else []
            ),
        ],
        "ports": [{"name": "http", "containerPort": serving.port, "protocol": "TCP"}],
        "resources": serving.resources.wire(),
        "startupProbe": probe("/health", period=10, failures=180, port="http"),
        "livenessProbe": probe("/health", period=20, failures=3, port="http"),
        "readinessProbe": probe("/ready", period=5, failures=2, port="http"),
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "terminationGracePeriodSeconds": 30,
        "securityContext": dict(POD_SECURITY),
    }
    identity = service_account or spec.trainer.service_account_name or default_service_account
    if identity:
        pod["serviceAccountName"] = identity
    if serving.node_selector:
        pod["nodeSelector"] = dict(serving.node_selector)
    if serving.tolerations:
        pod["tolerations"] = [dict(t) for t in serving.tolerations]
    metadata = _serving_metadata(pool)
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": serving.replicas,
            "selector": {"matchLabels": serving_labels(name)},
            # A new model or image: start the new pod before the old goes, so answers never stop.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": metadata["labels"],
                    "annotations": {MODEL_HASH_ANNOTATION: model_hash(pool)},
                },
                "spec": pod,
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _serving_metadata(pool),
        "spec": {
            "type": "ClusterIP",
            "selector": serving_labels(name),
            "ports": [{"name": "http", "port": serving.port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [deployment, service]
