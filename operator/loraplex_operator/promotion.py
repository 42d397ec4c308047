"""Promotion and rollback: which checkpoint of an experiment is the served adapter.

Promotion moves pointers and never touches the base model. ``status.adapter``
holds three: ``candidate`` (the newest checkpoint, written by the trainer),
``promoted`` (what is served) and ``previous`` (what ``promoted`` replaced,
so one edit rolls back). The pool's promoted-adapters ConfigMap mirrors every
experiment's ``promoted.uri``.

Rules, in order:

1. ``spec.promotion.promotedRevision`` (set by a person or by Git) wins under
   any policy: that revision is promoted, provided the operator has seen it as
   a candidate, promoted or previous revision (a bounded history kept in the
   experiment's ``loraplex.dev/adapter-revisions`` annotation). Naming the
   ``previous`` revision is the rollback. An unknown revision leaves the
   pointers alone and says ``RevisionNotFound``. While it is set, ``Auto``
   does not move the pointer: the pin is a person's decision.
2. ``Auto`` promotes the candidate when its metric passes
   ``spec.promotion.threshold`` (no threshold: any value) and beats the promoted
   revision's metric. Higher is better.
3. ``Manual`` without a pin changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import ValidationError

from loraplex_api import AdapterRevision, Condition
from loraplex_api.experiment import AdapterStatus, PromotionSpec

from .conditions import PROMOTED, Want
from .events import Event

HISTORY_LIMIT = 16
"""Revisions remembered per experiment (the promoted and previous ones always among them)."""

Result = Literal["promoted", "rolled_back", "revision_not_found"]


@dataclass(frozen=True)
class PromotionOutcome:
    """The pointers after a decision, the Promoted condition, and what happened (for events and metrics)."""

    promoted: AdapterRevision | None
    previous: AdapterRevision | None
    condition: Want | None
    """None while promotion has nothing to say (Manual, nothing promoted yet)."""
    history: tuple[AdapterRevision, ...]
    event: Event | None = None
    result: Result | None = None

    @property
    def moved(self) -> bool:
        """Whether the promoted pointer changed."""
        return self.result in ("promoted", "rolled_back")


def decide(
    promotion: PromotionSpec,
    adapter: AdapterStatus | None,
    history: Sequence[AdapterRevision],
    current: Condition | None = None,
) -> PromotionOutcome:
    """Apply the promotion rules (see the module docstring) to one experiment."""
    adapter = adapter or AdapterStatus()
    promoted, previous, candidate = adapter.promoted, adapter.previous, adapter.candidate
    seen = remember(history, (previous, promoted, candidate), keep=(previous, promoted))

    def stay(want: Want | None) -> PromotionOutcome:
        # An unchanged pointer keeps its condition as it was (reason RolledBack stays RolledBack).
        if current is not None and current.status == "True" and want is not None and want.status == "True":
            want = Want(PROMOTED, "True", current.reason, current.message)
        return PromotionOutcome(promoted, previous, want, seen)

    def move(to: AdapterRevision, why: str) -> PromotionOutcome:
        rollback = previous is not None and to.revision == previous.revision
        reason = "RolledBack" if rollback else "Promoted"
        result: Result = "rolled_back" if rollback else "promoted"
        replaced = f"; previous {promoted.revision}" if promoted is not None else ""
        message = f"revision {to.revision} ({to.uri}) {why}{replaced}"
        return PromotionOutcome(
            promoted=to,
            previous=promoted,
            condition=Want(PROMOTED, "True", reason, message),
            history=remember(seen, (to,), keep=(to, promoted)),
            event=Event("Normal", reason, message),
            result=result,
        )

    pinned = promotion.promoted_revision
    if pinned:
        if promoted is not None and promoted.revision == pinned:
            return stay(Want(PROMOTED, "True", "Promoted", f"revision {pinned} ({promoted.uri}) is promoted"))
        target = next((r for r in reversed(seen) if r.revision == pinned), None)
        if target is not None:
            verb = "rolled back to" if previous is not None and pinned == previous.revision else "promoted"
            return move(target, f"{verb} by spec.promotion.promotedRevision")
        known = ", ".join(r.revision for r in seen) or "none yet"
        message = (
            f"spec.promotion.promotedRevision: {pinned!r} was never a candidate of this experiment; "
            f"known revisions: {known}"
        )
        new = current is None or (current.reason, current.message) != ("RevisionNotFound", message)
        return PromotionOutcome(
            promoted,
            previous,
            Want(PROMOTED, "False", "RevisionNotFound", message),
            seen,
            event=Event("Warning", "RevisionNotFound", message) if new else None,
            result="revision_not_found" if new else None,
        )

    if promotion.policy == "Auto":
        verdict = _auto_verdict(promotion, candidate, promoted)
        if verdict is None and candidate is not None:
            return move(candidate, f"promoted automatically ({promotion.metric} {candidate.metric:g})")
        if promoted is not None:
            return stay(
                Want(
                    PROMOTED, "True", "Promoted", f"revision {promoted.revision} ({promoted.uri}) is promoted"
                )
            )
        return stay(verdict)

    if promoted is not None:
        return stay(
            Want(PROMOTED, "True", "Promoted", f"revision {promoted.revision} ({promoted.uri}) is promoted")
        )
    return stay(None)


def _auto_verdict(
    promotion: PromotionSpec, candidate: AdapterRevision | None, promoted: AdapterRevision | None
) -> Want | None:
    """None when Auto should promote the candidate, else the Promoted=False condition saying why not."""
    metric, threshold = promotion.metric, promotion.threshold
    if candidate is None:
        return Want(PROMOTED, "False", "NoCandidate", "no candidate checkpoint yet")
    if promoted is not None and candidate.revision == promoted.revision:
        return Want(PROMOTED, "False", "AlreadyPromoted", f"candidate {candidate.revision} is promoted")
    if candidate.metric is None:
        return Want(
            PROMOTED, "False", "NoMetric", f"candidate {candidate.revision} has no {metric} value yet"
        )
    if threshold is not None and candidate.metric < threshold:
        return Want(
            PROMOTED,
            "False",
            "BelowThreshold",
            f"candidate {candidate.revision} {metric} {candidate.metric:g} is below "
            f"spec.promotion.threshold {threshold:g}",
        )
    if promoted is not None and promoted.metric is not None and candidate.metric <= promoted.metric:
        return Want(
            PROMOTED,
            "False",
            "NotBetter",
            f"candidate {candidate.revision} {metric} {candidate.metric:g} does not beat promoted "
            f"{promoted.revision} {promoted.metric:g}",
        )
    return None


def remember(
    history: Sequence[AdapterRevision],
    revisions: Iterable[AdapterRevision | None],
    *,
    keep: Iterable[AdapterRevision | None] = (),
) -> tuple[AdapterRevision, ...]:
    """Add revisions to the history (newest last, one entry per revision), bounded to HISTORY_LIMIT.

    Trimming drops the oldest entries first, never those in ``keep`` (the promoted and previous
    revisions, which a rollback must still find).
    """
    entries = list(history)
    for revision in revisions:
        if revision is not None:
            entries = [r for r in entries if r.revision != revision.revision] + [revision]
    kept = {r.revision for r in keep if r is not None}
    while len(entries) > HISTORY_LIMIT:
        oldest = next((i for i, r in enumerate(entries) if r.revision not in kept), 0)
        del entries[oldest]
    return tuple(entries)


def parse_history(annotation: str | None) -> tuple[AdapterRevision, ...]:
    """Read the history annotation; an absent or damaged one is an empty history."""
    if not annotation:
        return ()
    try:
        raw = json.loads(annotation)
        return tuple(AdapterRevision.model_validate(item) for item in raw)
    except (ValueError, TypeError, ValidationError):
        return ()


def dump_history(history: Sequence[AdapterRevision]) -> str:
    """The history as the annotation stores it (compact JSON, camelCase)."""
    return json.dumps([r.wire() for r in history], separators=(",", ":"))
