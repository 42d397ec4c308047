"""Manifests for integration tests, and stand-ins for what a cluster would do: trainer pods, trainer reports."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .conftest import Api


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def pool(name: str, *, replicas: int = 1, slots: int = 2, max_rank: int = 64, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "SharedBasePool",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "smollm2", "uri": "builtin://smollm2-135m-instruct"},
            "replicas": replicas,
            "capacity": {"maxAdaptersPerReplica": slots, "maxLoRARank": max_rank},
        },
    }
    body["spec"].update(spec)
    return body


def experiment(name: str, pool_name: str, *, rank: int = 8, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "LoRAExperiment",
        "metadata": {"name": name},
        "spec": {
            "poolRef": {"name": pool_name},
            "lora": {"rank": rank},
            "dataset": {"builtin": {"name": "arithmetic", "size": 64}},
            "reward": {"builtin": {"name": "numeric_match"}},
            "algorithm": {"maxSteps": 10},
        },
    }
    body["spec"].update(spec)
    return body


def add_pod(api: Api, pool_name: str, ordinal: int, *, ready: bool = True) -> dict[str, Any]:
    """A trainer pod as the StatefulSet controller would create it, then its readiness as the kubelet reports it."""
    name = f"{pool_name}-{ordinal}"
    api.create(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": {
                    "app.kubernetes.io/name": "loraplex-trainer",
                    "app.kubernetes.io/instance": pool_name,
                    "loraplex.dev/pool": pool_name,
                    "statefulset.kubernetes.io/pod-name": name,
                },
            },
            "spec": {"containers": [{"name": "trainer", "image": "trainer"}]},
        }
    )
    return set_pod_ready(api, name, ready)


def set_pod_ready(api: Api, name: str, ready: bool, **container_waiting: str) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [
            {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now()}
        ],
    }
    if container_waiting:
        status["containerStatuses"] = [
            {"name": "trainer", "ready": False, "state": {"waiting": container_waiting}}
        ]
    return api.patch_status("Pod", name, status)


def report_training(api: Api, name: str, state: str, step: int = 0, total: int = 10, **extra: Any) -> None:
    """Write status.training as the trainer replica hosting the experiment would."""
    training = {
        "state": state,
        "step": step,
        "totalSteps": total,
        "progressPercentage": int(100 * step / total) if total else 0,
        "lastHeartbeatTime": now(),
        **extra,
    }
    api.patch_status("LoRAExperiment", name, {"training": training})


def report_candidate(api: Api, name: str, revision: str, metric: float | None, step: int = 0) -> None:
    """Write status.adapter.candidate as the trainer would after a checkpoint."""
    candidate: dict[str, Any] = {
        "revision": revision,
        "uri": f"file:///var/lib/loraplex/{name}/{revision}",
        "step": step,
    }
    if metric is not None:
        candidate["metric"] = metric
    api.patch_status("LoRAExperiment", name, {"adapter": {"candidate": candidate}})


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    """The condition of this type (an empty dict when absent), for terse assertions."""
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def placement(obj: dict[str, Any] | None) -> str | None:
    """The replica an experiment is placed on, or None."""
    return (((obj or {}).get("status") or {}).get("placement") or {}).get("replica")
