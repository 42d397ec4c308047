"""What the operator observed: typed, immutable snapshots of pools, experiments and trainer pods.

Watch events deliver raw dicts. They are parsed here once, through the
``loraplex_api`` models, into views the decisions read. A spec that does not
validate is kept as its list of problems (an experiment's becomes its
``InvalidSpec`` message); a status that does not parse is read as empty rather
than stopping the operator, since status is ours or the trainer's to rewrite.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from loraplex_api import API_VERSION, AdapterRevision, ManifestError, Problem, parse_document
from loraplex_api.experiment import LoRAExperiment, LoRAExperimentSpec, LoRAExperimentStatus
from loraplex_api.pool import SharedBasePool, SharedBasePoolStatus
from loraplex_api.wire import EXPERIMENT_KIND, HISTORY_ANNOTATION, POD_NAME_LABEL, POOL_LABEL

from .clock import from_rfc3339
from .promotion import parse_history

logger = logging.getLogger(__name__)

_ORDINAL = re.compile(r"-(\d+)$")
# Container states that mean the trainer cannot run until something changes, as opposed to starting.
FAILURE_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


def ref_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The identifying part of an object, enough to post an Event about it or to patch it."""
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid") if meta.get(k) is not None},
    }


def snapshot(body: Mapping[str, Any], *, spec: bool = True) -> dict[str, Any]:
    """A plain, detached copy of the parts of an object the operator reads (for indexes)."""
    meta = body.get("metadata") or {}
    kept_meta = {
        k: _plain(meta[k])
        for k in (
            "name",
            "namespace",
            "uid",
            "generation",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "labels",
            "annotations",
        )
        if k in meta
    }
    out = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": kept_meta}
    for key in ("spec", "status") if spec else ("status",):
        if key in body:
            out[key] = _plain(body[key])
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class PodView:
    """A trainer pod of a pool: which replica it is and whether it is ready."""

    name: str
    pool: str
    ready: bool
    since: float | None
    """When readiness last changed (the Ready condition's lastTransitionTime), else the pod's creation."""
    deleting: bool
    problem: str = ""
    """Why the trainer cannot run, e.g. ``CrashLoopBackOff: back-off 5m0s``; empty while it can."""
    incarnation: str = ""
    """``<pod uid>/<container restarts>``: changes whenever the trainer process starts again."""

    @property
    def ordinal(self) -> int | None:
        """The StatefulSet ordinal from the pod name."""
        match = _ORDINAL.search(self.name)
        return int(match.group(1)) if match else None


def observe_pod(body: Mapping[str, Any]) -> PodView | None:
    """Read a trainer pod; None for pods that are not a pool's StatefulSet replicas."""
    meta = body.get("metadata") or {}
    labels = meta.get("labels") or {}
    pool = labels.get(POOL_LABEL)
    name = labels.get(POD_NAME_LABEL) or meta.get("name")
    if not pool or not name:
        return None
    status = body.get("status") or {}
    ready_condition = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    ready = bool(ready_condition and ready_condition.get("status") == "True")
    since = from_rfc3339((ready_condition or {}).get("lastTransitionTime")) or from_rfc3339(
        meta.get("creationTimestamp")
    )
    problem = ""
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FAILURE_REASONS:
            detail = str(waiting.get("message") or "")[:200]
            problem = f"{waiting['reason']}: {detail}" if detail else str(waiting["reason"])
            break
    if status.get("phase") == "Failed":
        problem = problem or f"pod failed: {status.get('reason') or status.get('message') or 'unknown'}"
    deleting = bool(meta.get("deletionTimestamp"))
    restarts = sum(int(c.get("restartCount") or 0) for c in status.get("containerStatuses") or [])
    return PodView(
        name=str(name),
        pool=str(pool),
        ready=ready and not deleting,
        since=since,
        deleting=deleting,
        problem=problem,
        incarnation=f"{meta['uid']}/{restarts}" if meta.get("uid") else "",
    )


@dataclass(frozen=True)
class PoolView:
    """A SharedBasePool as observed."""

    namespace: str
    name: str
    generation: int | None
    pool: SharedBasePool | None
    """The validated resource; None when its spec does not validate."""
    problems: tuple[Problem, ...]
    status: SharedBasePoolStatus
    deleting: bool
    ref: Mapping[str, Any] = field(hash=False)
    raw_status: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """The status exactly as stored, to patch only what differs."""


def observe_pool(body: Mapping[str, Any]) -> PoolView:
    """Parse a pool body (spec problems are kept, not raised)."""
    meta = body.get("metadata") or {}
    status = _lenient(SharedBasePoolStatus, body.get("status"))
    document = {k: body.get(k) for k in ("apiVersion", "kind", "metadata", "spec")}
    pool: SharedBasePool | None = None
    problems: tuple[Problem, ...] = ()
    try:
        parsed = parse_document(document)
        assert isinstance(parsed, SharedBasePool)
        pool = parsed
    except ManifestError as exc:
        problems = tuple(exc.problems)
    return PoolView(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        generation=meta.get("generation"),
        pool=pool,
        problems=problems,
        status=status,
        deleting=bool(meta.get("deletionTimestamp")),
        ref=ref_of(body),
        raw_status=_mapping(body.get("status")),
    )


@dataclass(frozen=True)
class ExperimentView:
    """A LoRAExperiment as observed."""

    namespace: str
    name: str
    uid: str
    generation: int | None
    created: float
    pool: str
    """``spec.poolRef.name``, read even from a spec that does not validate ('' when absent)."""
    spec: LoRAExperimentSpec | None
    """The validated spec; None when it does not validate."""
    problems: tuple[Problem, ...]
    status: LoRAExperimentStatus
    labels: Mapping[str, str] = field(hash=False)
    history: tuple[AdapterRevision, ...]
    """Adapter revisions the operator has seen (from the history annotation)."""
    ref: Mapping[str, Any] = field(hash=False)
    raw_status: Mapping[str, Any] = field(default_factory=dict, hash=False)
    """The status exactly as stored, to patch only what differs."""

    @property
    def key(self) -> str:
        """``namespace/name``: the scheduler's experiment key."""
        return f"{self.namespace}/{self.name}"


def observe_experiment(body: Mapping[str, Any]) -> ExperimentView:
    """Parse an experiment body (spec problems are kept, not raised)."""
    meta = body.get("metadata") or {}
    raw_spec = _mapping(body.get("spec"))
    pool_ref = _mapping(raw_spec.get("poolRef"))
    spec: LoRAExperimentSpec | None = None
    problems: tuple[Problem, ...] = ()
    document = {"apiVersion": API_VERSION, "kind": EXPERIMENT_KIND, "metadata": meta, "spec": raw_spec}
    try:
        parsed = parse_document(document)
        assert isinstance(parsed, LoRAExperiment)
        spec = parsed.spec
    except ManifestError as exc:
        problems = tuple(exc.problems)
    return ExperimentView(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        generation=meta.get("generation"),
        created=from_rfc3339(meta.get("creationTimestamp")) or 0.0,
        pool=str(pool_ref.get("name") or ""),
        spec=spec,
        problems=problems,
        status=_lenient(LoRAExperimentStatus, body.get("status")),
        labels=dict(meta.get("labels") or {}),
        history=parse_history((meta.get("annotations") or {}).get(HISTORY_ANNOTATION)),
        ref=ref_of(body),
        raw_status=_mapping(body.get("status")),
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    """The value if it is a mapping, else an empty one (a malformed spec must not stop the read)."""
    return value if isinstance(value, Mapping) else {}


def _lenient(model: Any, raw: Any) -> Any:
    """Parse a status; a damaged one reads as empty (and is logged) instead of stopping the operator."""
    try:
        return model.model_validate(raw or {})
    except ValidationError as exc:
        logger.warning(
            "ignoring a status that does not parse model=%s errors=%d", model.__name__, exc.error_count()
        )
        return model()
