"""A pool's children as manifests: the trainer StatefulSet, its Services and the promoted-adapters ConfigMap.

Everything here is a pure function of the SharedBasePool; the controller
applies what it returns. Replica names are the StatefulSet's pod names
(``<pool>-<ordinal>``), which is what the scheduler places experiments on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from loraplex_api import SharedBasePool
from loraplex_api.wire import (
    API_VERSION,
    CACHE_ENV,
    HEALTH_PORT,
    KUEUE_QUEUE_LABEL,
    METRICS_PORT,
    MODEL_HASH_ANNOTATION,
    MODEL_URI_ENV,
    POD_NAME_ENV,
    POD_NAMESPACE_ENV,
    POOL_ENV,
    POOL_KIND,
    POOL_LABEL,
    REWARD_CONFINEMENT_ENV,
    STORAGE_MOUNT,
    promoted_configmap_name,
)

TRAINER_CONTAINER = "trainer"
MODEL_MOUNT = "/models"
HF_CACHE_MOUNT = "/var/cache/huggingface"
CACHE_MOUNT = "/var/cache/loraplex"
RUN_AS = 1000
MAX_POOL_NAME = 52
"""The StatefulSet controller labels pods with ``<name>-<10-char hash>``, and a label value has 63 characters."""

TRAINER_NAME = "loraplex-trainer"
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
"""Every container a pool renders (trainer, serving)."""
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "fsGroup": RUN_AS,
    "seccompProfile": {"type": "RuntimeDefault"},
}
"""Every pod a pool renders: the image's uid 1000, RuntimeDefault seccomp."""
RESERVED_ENV = frozenset({POD_NAME_ENV, POD_NAMESPACE_ENV, POOL_ENV, REWARD_CONFINEMENT_ENV})


class RenderError(ValueError):
    """The pool cannot be rendered; the message names the field and what would be right."""


def statefulset_name(pool: str) -> str:
    """The trainer StatefulSet's name: the pool's own, so pods are ``<pool>-0``, ``<pool>-1``..."""
    return pool


def headless_service_name(pool: str) -> str:
    """The headless Service that gives every replica a stable DNS name."""
    return f"{pool}-headless"


def metrics_service_name(pool: str) -> str:
    """The Service Prometheus (or a ServiceMonitor) scrapes the trainer metrics through."""
    return f"{pool}-metrics"


def selector_labels(pool: str) -> dict[str, str]:
    """Labels that select a pool's trainer pods (immutable once a StatefulSet exists)."""
    return {"app.kubernetes.io/name": TRAINER_NAME, "app.kubernetes.io/instance": pool, POOL_LABEL: pool}


def selector_string(pool: str) -> str:
    """The same selector as a string, for the pool's ``status.selector`` (the /scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(pool).items())


def common_labels(pool: str, component: str = "trainer") -> dict[str, str]:
    """Labels on everything a pool owns."""
    return {
        **selector_labels(pool),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "loraplex",
        "app.kubernetes.io/managed-by": "loraplex-operator",
    }


def owner_reference(pool: SharedBasePool) -> dict[str, Any]:
    """The owner reference that lets the garbage collector delete a pool's children with it."""
    return {
        "apiVersion": API_VERSION,
        "kind": POOL_KIND,
        "name": pool.metadata.name,
        "uid": pool.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(pool: SharedBasePool, name: str, component: str = "trainer") -> dict[str, Any]:
    return {
        "name": name,
        "namespace": pool.metadata.namespace,
        "labels": common_labels(pool.metadata.name, component),
        "ownerReferences": [owner_reference(pool)],
    }


def check_renderable(pool: SharedBasePool) -> None:
    """Raise RenderError for a pool whose children Kubernetes would refuse."""
    name = pool.metadata.name
    if len(name) > MAX_POOL_NAME:
        raise RenderError(
            f"metadata.name: {name!r} has {len(name)} characters; a pool name must have at most "
            f"{MAX_POOL_NAME} so its pods' controller-revision-hash label fits in 63"
        )
    if pool.metadata.uid is None:
        raise RenderError("metadata.uid: missing; the pool must be read from the API server")


def render_statefulset(pool: SharedBasePool, *, default_service_account: str | None = None) -> dict[str, Any]:
    """The trainer StatefulSet: one pod per replica, all hosting the pool's base model."""
    check_renderable(pool)
    spec = pool.spec
    name = pool.metadata.name
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _with_queue(pool, _metadata(pool, statefulset_name(name))),
        "spec": {
            # A suspended pool keeps spec.replicas so resuming restores it.
            "replicas": 0 if spec.suspend else spec.replicas,
            "serviceName": headless_service_name(name),
            # Replicas are interchangeable hosts: start and stop them all at once, not one by one.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector_labels(name)},
            "updateStrategy": {"type": "RollingUpdate"},
            "template": _pod_template(pool, default_service_account),
        },
    }


def _pod_template(pool: SharedBasePool, default_service_account: str | None) -> dict[str, Any]:
    trainer = pool.spec.trainer
    volumes, mounts, env = pod_volumes(pool)
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": trainer.image,
        "imagePullPolicy": trainer.image_pull_policy,
        "args": [
            "loraplex",
            "agent",
            f"--storage={STORAGE_MOUNT}",
            f"--health-port={HEALTH_PORT}",
            f"--metrics-port={METRICS_PORT}",
        ],
        "env": _env(pool) + env,
        "ports": [
            {"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": trainer.resources.wire(),
        # Loading a large base model can take many minutes: the startup probe holds the liveness
        # probe back for up to 30 minutes, after which a hung trainer is restarted within a minute.
        "startupProbe": probe("/healthz", period=10, failures=180),
        "livenessProbe": probe("/healthz", period=20, failures=3),
        "readinessProbe": probe("/readyz", period=5, failures=2),
        "securityContext": dict(CONTAINER_SECURITY),
        "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        # On SIGTERM the agent finishes the step in flight and checkpoints every adapter (shutdown.py).
        "terminationGracePeriodSeconds": 120,
        "securityContext": dict(POD_SECURITY),
    }
    service_account = trainer.service_account_name or default_service_account
    if service_account:
        pod["serviceAccountName"] = service_account
    if trainer.priority_class_name:
        pod["priorityClassName"] = trainer.priority_class_name
    if trainer.node_selector:
        pod["nodeSelector"] = dict(trainer.node_selector)
    if trainer.tolerations:
        pod["tolerations"] = [dict(t) for t in trainer.tolerations]
    if trainer.affinity:
        pod["affinity"] = dict(trainer.affinity)
    # The model is loaded once at start: a change of uri, revision or dtype must replace the pods.
    annotations = {MODEL_HASH_ANNOTATION: model_hash(pool)}
    metadata = {"labels": common_labels(pool.metadata.name), "annotations": annotations}
    return {"metadata": _with_queue(pool, metadata), "spec": pod}


def _with_queue(pool: SharedBasePool, metadata: dict[str, Any]) -> dict[str, Any]:
    """Metadata with Kueue's queue label when the pool names a LocalQueue (trainer.queueName)."""
    queue = pool.spec.trainer.queue_name
    if queue:
        metadata["labels"] = {**metadata["labels"], KUEUE_QUEUE_LABEL: queue}
    return metadata


def model_hash(pool: SharedBasePool) -> str:
    """A short digest of ``spec.model``: equal for the same model, different for any change."""
    wire = json.dumps(pool.spec.model.wire(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(wire.encode()).hexdigest()[:16]


def probe(path: str, *, period: int, failures: int, port: str = "health") -> dict[str, Any]:
    """An HTTP probe on a named container port (5 s to answer)."""
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _env(pool: SharedBasePool) -> list[dict[str, Any]]:
    """The user's env first, then the identity the agent reads (which a user's entry cannot shadow)."""
    env = [e.wire() for e in pool.spec.trainer.env if e.name not in RESERVED_ENV]
    env += [
        {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": POD_NAMESPACE_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": POOL_ENV, "value": pool.metadata.name},
        # Tenants share this pod: a reward worker that cannot be confined must not run at all.
        {"name": REWARD_CONFINEMENT_ENV, "value": "required"},
    ]
    return env


def pod_volumes(
    pool: SharedBasePool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Volumes, the trainer's mounts and the env that tells it where they are."""
    storage = pool.spec.storage
    sub_path = storage.sub_path.strip("/")
    volumes: list[dict[str, Any]] = [
        # The root filesystem is read-only; Python, torch and the tokenizers still want scratch space.
        {"name": "tmp", "emptyDir": {}},
        {"name": "cache", "emptyDir": {}},
        # Shared memory for rollout engines (vLLM, torch multiprocessing); the default 64Mi is too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "cache", "mountPath": CACHE_MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    env: list[dict[str, Any]] = [
        {"name": "HOME", "value": "/tmp"},
        {"name": CACHE_ENV, "value": CACHE_MOUNT},
    ]

    if storage.claim_name:
        volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": storage.claim_name}})
        mounts.append(_mount("storage", STORAGE_MOUNT, sub_path))
    else:
        volumes.append({"name": "storage", "emptyDir": {}})
        mounts.append({"name": "storage", "mountPath": STORAGE_MOUNT})

    uri = pool.spec.model.uri
    if uri.startswith("pvc://"):
        claim, _, path = uri.removeprefix("pvc://").partition("/")
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": "model", "mountPath": f"{MODEL_MOUNT}/{claim}", "readOnly": True})
        # The trainer loads local folders only; this is where the claim's model folder appears.
        env.append({"name": MODEL_URI_ENV, "value": f"file://{MODEL_MOUNT}/{claim}/{path}".rstrip("/")})
    elif uri.startswith("hf://"):
        # The trainer downloads the model into the Hugging Face cache. With shared storage the
        # cache lives there, so replicas and restarts download once (the hub client locks files
        # while it writes); without it each pod downloads into an emptyDir of its own.
        if storage.claim_name:
            cache_path = f"{sub_path}/huggingface" if sub_path else "huggingface"
            mounts.append(_mount("storage", HF_CACHE_MOUNT, cache_path))
        else:
            volumes.append({"name": "hf-cache", "emptyDir": {}})
            mounts.append({"name": "hf-cache", "mountPath": HF_CACHE_MOUNT})
        env += [
            {"name": "HF_HOME", "value": HF_CACHE_MOUNT},
            {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        ]
        token = pool.spec.model.token_secret_ref
        if token is not None:
            secret = {"secretKeyRef": {"name": token.name, "key": token.key}}
            env.append({"name": "HF_TOKEN", "valueFrom": secret})
    return volumes, mounts, env


def _mount(volume: str, path: str, sub_path: str) -> dict[str, Any]:
    mount = {"name": volume, "mountPath": path}
    if sub_path:
        mount["subPath"] = sub_path
    return mount


def render_headless_service(pool: SharedBasePool) -> dict[str, Any]:
    """The headless Service behind the StatefulSet: stable DNS per replica, ready or not."""
    check_renderable(pool)
    name = pool.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, headless_service_name(name)),
        "spec": {
            "clusterIP": "None",
            # A replica loading its model is not ready yet, but must still be resolvable.
            "publishNotReadyAddresses": True,
            "selector": selector_labels(name),
            "ports": [{"name": "health", "port": HEALTH_PORT, "targetPort": "health", "protocol": "TCP"}],
        },
    }


def render_metrics_service(pool: SharedBasePool) -> dict[str, Any]:
    """The Service that exposes every replica's trainer metrics to Prometheus."""
    check_renderable(pool)
    name = pool.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(pool, metrics_service_name(name), component="trainer-metrics"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(name),
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}],
        },
    }


def render_promoted_configmap(pool: SharedBasePool, adapters: Mapping[str, str]) -> dict[str, Any]:
    """The promoted-adapters ConfigMap: adapter name (the experiment's name) -> checkpoint URI."""
    check_renderable(pool)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(pool, promoted_configmap_name(pool.metadata.name), component="adapters"),
        "data": dict(sorted(adapters.items())),
    }


def render_children(
    pool: SharedBasePool, *, default_service_account: str | None = None
) -> list[dict[str, Any]]:
    """Every child the pool owns except the ConfigMap (whose data comes from the experiments)."""
    return [
        render_statefulset(pool, default_service_account=default_service_account),
        render_headless_service(pool),
        render_metrics_service(pool),
    ]
