"""Every name the operator, the trainer and the cluster must spell alike, defined once.

The operator renders pods and writes labels; the trainer agent inside those pods reads them;
a serving pod reads the promoted-adapters ConfigMap. Each side imports the name from here, so
a rename is one edit and the two sides cannot drift apart.
"""

from __future__ import annotations

# ----------------------------------------------------------------- the API
GROUP = "loraplex.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

POOL_KIND = "SharedBasePool"
POOL_PLURAL = "sharedbasepools"
POOL_SINGULAR = "sharedbasepool"
POOL_SHORT_NAMES = ("sbp",)

EXPERIMENT_KIND = "LoRAExperiment"
EXPERIMENT_PLURAL = "loraexperiments"
EXPERIMENT_SINGULAR = "loraexperiment"
EXPERIMENT_SHORT_NAMES = ("lexp",)

# ----------------------------------------------------------------- labels and annotations
POOL_LABEL = f"{GROUP}/pool"
"""On experiments (the pool they reference) and on everything a pool owns."""
REPLICA_LABEL = f"{GROUP}/replica"
"""On a placed experiment: the replica it is placed on, beside ``status.placement`` (the agent lists by it)."""
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
"""Set by the StatefulSet controller on every pod: the replica's name."""
MODEL_HASH_ANNOTATION = f"{GROUP}/model-hash"
"""On a trainer pod template: a digest of spec.model, so a new model rolls the pods."""
HISTORY_ANNOTATION = f"{GROUP}/adapter-revisions"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
"""Kueue admits a StatefulSet (and its pods) labelled with the LocalQueue to queue it in."""
"""On an experiment: the adapter revisions the operator has seen, so a rollback can name any of them."""

# ----------------------------------------------------------------- the trainer pod's contract
POD_NAME_ENV = "POD_NAME"
POD_NAMESPACE_ENV = "POD_NAMESPACE"
POOL_ENV = "LORAPLEX_POOL"
MODEL_URI_ENV = "LORAPLEX_MODEL_URI"
"""Overrides ``spec.model.uri`` inside the pod: where a mounted ``pvc://`` model appears (``file://...``)."""
CACHE_ENV = "LORAPLEX_CACHE"
"""A writable folder for the trainer's caches (the dequantized builtin model)."""

REWARD_UIDS_ENV = "LORAPLEX_REWARD_UIDS"
"""A uid range (``20000-29999``): a trainer running as root starts each experiment's reward worker as its own uid."""
REWARD_PYTHON_ENV = "LORAPLEX_REWARD_PYTHON"
"""The interpreter reward workers run (one their uids may execute); default: the trainer's own."""

REWARD_CONFINEMENT_ENV = "LORAPLEX_REWARD_CONFINEMENT"
"""``required`` (set in trainer pods): a reward worker that can be neither Landlocked nor given its
own uid fails its experiment instead of running unconfined."""

STORAGE_MOUNT = "/var/lib/loraplex"
"""Where the pool's storage is mounted in a trainer pod (adapters, checkpoints, metrics)."""
HEALTH_PORT = 8081
"""The agent's ``/healthz`` and ``/readyz``."""
SERVING_API_KEY_ENV = "LORAPLEX_SERVING_API_KEY"
"""In a serving pod, from serving.apiKeySecretRef: the key /v1 requests must send."""
METRICS_PORT = 9400
"""The agent's Prometheus metrics."""


def experiment_folder(namespace: str, name: str, uid: str | None) -> str:
    """An experiment's folder under the pool's storage (relative): adapter, checkpoints, metrics.

    The uid is part of it, so an experiment deleted and created again under the same name starts
    fresh instead of resuming the old one's checkpoints.
    """
    return f"{namespace}/{name}/{uid}" if uid else f"{namespace}/{name}"


def promoted_configmap_name(pool: str) -> str:
    """The ConfigMap that maps each promoted experiment's name (the adapter name) to its checkpoint URI."""
    return f"{pool}-promoted-adapters"
