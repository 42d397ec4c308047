"""An experiment's lifecycle: from what was observed to the status the operator owns.

One pass over an experiment has three steps, all pure:

1. :func:`assess` reads the experiment, its pool and the trainer's report and
   says where it stands: ``finished`` (Succeeded or Failed, for good),
   ``held`` (suspended, or its pool is missing, invalid or suspended),
   ``placed`` (keeps its replica) or ``pending`` (needs the scheduler).
2. The scheduler places the pending ones; :func:`settle` folds its answer in.
3. :func:`owned_status` turns the verdict into conditions, phase and the
   status fields the operator writes.

Rules worth knowing (each is in :func:`assess`):

- A spec that does not validate, or that its pool cannot run (rank above
  ``maxLoRARank``, unknown target modules, too big for the memory budget),
  fails with ``InvalidSpec``; a new generation of the spec is judged again.
- The trainer's ``Completed``/``Failed`` report finishes the experiment and
  frees its slot; ``Running`` makes ``Training`` True; a report older than the
  heartbeat grace makes it Unknown.
- ``spec.suspend`` unplaces without counting a restart, and restarts the
  ``activeDeadlineSeconds`` clock on resume (as a Kubernetes Job does).
- A replica that is gone (scaled away, or not ready for longer than the
  replica grace) costs its experiments a restart and a new placement;
  more restarts than ``spec.backoffLimit`` fail it with ``BackoffLimitExceeded``.
- A replica whose trainer process starts again (its container's restart count
  rises, or its pod is recreated) costs its experiments a restart at once, even
  inside the replica grace; they keep the replica and resume from their last
  checkpoint. So a crash loop is bounded by ``backoffLimit`` too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from loraplex_api import AdapterRevision, Condition, Problem
from loraplex_api.experiment import Phase, Placement, TrainingStatus
from loraplex_api.pool import SharedBasePool
from loraplex_api.wire import EXPERIMENT_KIND

from . import scheduler
from .clock import from_rfc3339, to_rfc3339
from .conditions import (
    FAILED,
    PLACED,
    PROMOTED,
    READY,
    RECONCILING,
    STALLED,
    SUCCEEDED,
    SUSPENDED,
    TRAINING,
    Want,
    apply_all,
    experiment_phase,
    experiment_summary,
    find,
)
from .events import Event
from .memory import ModelFacts
from .observed import ExperimentView
from .promotion import PromotionOutcome
from .validation import check_against_pool, describe

INVALID_SPEC = "InvalidSpec"
CONDITION_ORDER = (READY, PLACED, TRAINING, SUSPENDED, PROMOTED, SUCCEEDED, FAILED, RECONCILING, STALLED)
FINISHED_MESSAGE = "finished; holds no slot"

State = Literal["finished", "held", "placed", "pending"]
PoolAvailability = Literal["ok", "missing", "invalid", "suspended"]


@dataclass(frozen=True)
class Timing:
    """Grace periods (seconds) before silence counts as failure."""

    heartbeat_grace: float = 120.0
    """A trainer report older than this makes ``Training`` Unknown."""
    replica_grace: float = 60.0
    """A replica not ready for longer than this is gone: its experiments are placed again."""


@dataclass(frozen=True)
class PoolContext:
    """What the decisions about an experiment need to know about its pool."""

    name: str
    availability: PoolAvailability
    message: str = ""
    pool: SharedBasePool | None = None
    facts: ModelFacts | None = None
    desired_replicas: int = 0
    unhealthy_since: Mapping[str, float] = field(default_factory=dict)
    """Replicas (within the desired count) that are not ready, and since when."""
    incarnations: Mapping[str, str] = field(default_factory=dict)
    """Each replica's current pod as ``<pod uid>/<container restarts>`` (see PodView)."""

    def gone(self, replica: str, *, now: float, grace: float) -> str | None:
        """Why a replica no longer hosts experiments, or None while it does (or may recover)."""
        ordinal = replica.rsplit("-", 1)[-1]
        if not replica.startswith(f"{self.name}-") or not ordinal.isdigit():
            return f"{replica} is not a replica of pool {self.name}"
        if int(ordinal) >= self.desired_replicas:
            return (
                f"replica {replica} was scaled away (pool {self.name} has {self.desired_replicas} replicas)"
            )
        since = self.unhealthy_since.get(replica)
        if since is not None and now - since >= grace:
            return f"replica {replica} has not been ready since {to_rfc3339(since)} (grace {grace:g}s)"
        return None


@dataclass(frozen=True)
class Verdict:
    """Where an experiment stands: its state and the decisions made so far."""

    state: State
    wants: tuple[Want, ...] = ()
    drop: tuple[str, ...] = ()
    placement: Placement | None = None
    restarts: int = 0
    start_time: str | None = None
    completion_time: str | None = None
    events: tuple[Event, ...] = ()


@dataclass(frozen=True)
class OwnedStatus:
    """The status fields the operator writes on an experiment (docs/architecture.md, who writes what)."""

    observed_generation: int | None
    phase: Phase
    conditions: tuple[Condition, ...]
    placement: Placement | None
    restarts: int
    start_time: str | None
    completion_time: str | None
    promoted: AdapterRevision | None
    previous: AdapterRevision | None

    def wire(self) -> dict[str, object]:
        """The status as a merge patch writes it (None removes a field)."""
        return {
            "observedGeneration": self.observed_generation,
            "phase": self.phase,
            "conditions": [c.wire() for c in self.conditions],
            "placement": self.placement.wire() if self.placement else None,
            "restarts": self.restarts,
            "startTime": self.start_time,
            "completionTime": self.completion_time,
            "adapter": {
                "promoted": self.promoted.wire() if self.promoted else None,
                "previous": self.previous.wire() if self.previous else None,
            },
        }


def assess(exp: ExperimentView, pool: PoolContext | None, *, now: float, timing: Timing) -> Verdict:
    """Where the experiment stands before scheduling (see the module docstring for the rules)."""
    status = exp.status
    conditions = status.conditions
    base = Verdict(
        state="pending",
        restarts=status.restarts,
        start_time=status.start_time,
        completion_time=status.completion_time,
    )

    succeeded, failed = find(conditions, SUCCEEDED), find(conditions, FAILED)
    if succeeded is not None and succeeded.status == "True":
        return _finished(base, succeeded, training_reason="Completed", now=now)
    judged_again = (
        failed is not None
        and failed.status == "True"
        and failed.reason == INVALID_SPEC
        and failed.observed_generation != exp.generation
    )
    if failed is not None and failed.status == "True" and not judged_again:
        return _finished(base, failed, training_reason=failed.reason, now=now)
    if judged_again:
        base = replace(base, drop=(FAILED,), completion_time=None)
    if exp.spec is None:
        return _failed(exp, base, INVALID_SPEC, describe(exp.problems), now)
    spec = exp.spec

    training = status.training
    if training is not None and training.state == "Completed":
        message = training.message or f"trained {training.step}/{training.total_steps} steps"
        return _finish(base, Want(SUCCEEDED, "True", "Completed", message), "Completed", now)
    if training is not None and training.state == "Failed":
        return _failed(exp, base, "TrainingFailed", training.message or "the trainer reported a failure", now)

    if spec.suspend:
        return replace(
            base,
            state="held",
            start_time=None,
            wants=(
                Want(SUSPENDED, "True", "SpecSuspend", "spec.suspend is true; the adapter is unloaded"),
                Want(PLACED, "False", "Suspended", "spec.suspend is true"),
                Want(TRAINING, "False", "Suspended", "spec.suspend is true"),
            ),
        )
    if find(conditions, SUSPENDED) is not None:
        base = replace(base, wants=(Want(SUSPENDED, "False", "Resumed", "spec.suspend is false"),))

    if pool is None or pool.availability != "ok":
        reason, message = _unavailable(exp, pool)
        held = (Want(PLACED, "False", reason, message), Want(TRAINING, "False", "Pending", "not placed"))
        return replace(base, state="held", wants=(*base.wants, *held))
    assert pool.pool is not None

    placement = status.placement if status.placement and status.placement.pool == pool.name else None
    spec_changed = status.observed_generation is not None and status.observed_generation != exp.generation
    if placement is None or spec_changed:
        problems = check_against_pool(exp.name, spec, pool.pool, pool.facts)
        if problems:
            return _failed(exp, base, INVALID_SPEC, describe(problems), now)

    started = from_rfc3339(base.start_time)
    deadline = spec.active_deadline_seconds
    if deadline is not None and started is not None and now - started >= deadline:
        message = f"ran for more than spec.activeDeadlineSeconds {deadline}s since {base.start_time}"
        return _failed(exp, base, "DeadlineExceeded", message, now)

    if placement is None:
        return base
    lost = pool.gone(placement.replica, now=now, grace=timing.replica_grace)
    if lost is not None:
        restarts = base.restarts + 1
        if restarts > spec.backoff_limit:
            message = f"{lost}; {base.restarts} restart(s) already, spec.backoffLimit is {spec.backoff_limit}"
            return _failed(exp, base, "BackoffLimitExceeded", message, now)
        note = Event("Warning", "ReplicaLost", f"{lost}; placing again (restart {restarts})")
        return replace(base, restarts=restarts, events=(note,))
    placement, restarted = _follow_incarnation(placement, pool.incarnations.get(placement.replica))
    if restarted is not None:
        restarts = base.restarts + 1
        if restarts > spec.backoff_limit:
            message = (
                f"{restarted}; {base.restarts} restart(s) already, spec.backoffLimit is {spec.backoff_limit}"
            )
            return _failed(exp, base, "BackoffLimitExceeded", message, now)
        note = Event("Warning", "ReplicaRestarted", f"{restarted}; resuming from the last checkpoint")
        base = replace(base, restarts=restarts, events=(note,))
    want = training_condition(training, placement, now=now, grace=timing.heartbeat_grace)
    placed = Want(
        PLACED, "True", "Scheduled", f"placed on replica {placement.replica} of pool {placement.pool}"
    )
    return replace(base, state="placed", placement=placement, wants=(*base.wants, placed, want))


def _follow_incarnation(placement: Placement, current: str | None) -> tuple[Placement, str | None]:
    """The placement with the replica's current pod recorded, and why it counts as a restart (if it does).

    The first pod seen after placing is recorded without counting: the experiment had not run yet.
    """
    recorded = placement.replica_incarnation
    if not current or current == recorded:
        return placement, None
    updated = placement.model_copy(update={"replica_incarnation": current})
    if recorded is None:
        return updated, None
    old_uid, _, old_restarts = recorded.partition("/")
    new_uid, _, new_restarts = current.partition("/")
    if old_uid != new_uid:
        why = f"replica {placement.replica} was recreated (a new pod)"
    else:
        why = f"replica {placement.replica}'s trainer restarted (container restarts {old_restarts} -> {new_restarts})"
    return updated, why


def training_condition(
    training: TrainingStatus | None, placement: Placement, *, now: float, grace: float
) -> Want:
    """The Training condition of a placed experiment from the trainer's latest report.

    A report written before this placement (the previous replica's) does not count. Messages
    carry no progress counters, so a trainer's progress report does not rewrite the conditions.
    """
    replica = placement.replica
    placed_at = from_rfc3339(placement.placed_at) or now
    heartbeat = from_rfc3339(training.last_heartbeat_time) if training is not None else None
    current = training is not None and (heartbeat is None or heartbeat >= placed_at)
    if training is None or not current:
        last, want = (
            placed_at,
            Want(
                TRAINING, "False", "WaitingForTrainer", f"waiting for replica {replica} to load the adapter"
            ),
        )
    elif training.state == "Loading":
        last = heartbeat or placed_at
        want = Want(
            TRAINING, "False", "Loading", training.message or f"replica {replica} is loading the adapter"
        )
    elif training.state == "Interrupted":
        # The replica stopped on a signal after a checkpoint; it or its successor resumes the adapter.
        last = heartbeat or placed_at
        want = Want(
            TRAINING,
            "False",
            "Interrupted",
            f"replica {replica} stopped on a signal after checkpointing; training resumes from that checkpoint",
        )
    else:
        last, want = (
            heartbeat or placed_at,
            Want(TRAINING, "True", "Running", f"training on replica {replica}"),
        )
    if now - last > grace:
        return Want(
            TRAINING,
            "Unknown",
            "HeartbeatTimeout",
            f"no report from replica {replica} since {to_rfc3339(last)} (grace {grace:g}s)",
        )
    return want


def settle(
    exp: ExperimentView,
    verdict: Verdict,
    outcome: scheduler.Placement | scheduler.Unplaced | None,
    *,
    now: float,
    incarnations: Mapping[str, str] | None = None,
) -> Verdict:
    """Fold the scheduler's answer for a pending experiment into its verdict."""
    if verdict.state != "pending":
        return verdict
    if isinstance(outcome, scheduler.Placement):
        placement = Placement(
            pool=exp.pool,
            replica=outcome.replica,
            placed_at=to_rfc3339(now),
            replica_incarnation=(incarnations or {}).get(outcome.replica),
        )
        return replace(
            verdict,
            state="placed",
            placement=placement,
            start_time=verdict.start_time or to_rfc3339(now),
            wants=(
                *verdict.wants,
                Want(PLACED, "True", "Scheduled", f"placed on replica {outcome.replica} of pool {exp.pool}"),
                Want(
                    TRAINING,
                    "False",
                    "WaitingForTrainer",
                    f"waiting for replica {outcome.replica} to load the adapter",
                ),
            ),
        )
    if outcome is not None and outcome.reason in scheduler.UNFIT_REASONS:
        problem = Problem(EXPERIMENT_KIND, exp.name, "", outcome.message)
        return _failed(exp, verdict, INVALID_SPEC, describe([problem]), now)
    reason, message = (
        (outcome.reason, outcome.message)
        if outcome is not None
        else ("WaitingForCapacity", "waiting for a replica")
    )
    return replace(
        verdict,
        wants=(
            *verdict.wants,
            Want(PLACED, "False", reason, message),
            Want(TRAINING, "False", "Pending", "not placed"),
        ),
    )


def owned_status(
    exp: ExperimentView, verdict: Verdict, promotion: PromotionOutcome, *, now: float
) -> OwnedStatus:
    """The status the operator writes: conditions (with the summaries), phase and pointers."""
    stamp = to_rfc3339(now)
    wants: list[Want] = list(verdict.wants)
    drop = list(verdict.drop)
    if promotion.condition is not None:
        wants.append(promotion.condition)
    else:
        drop.append(PROMOTED)
    conditions = apply_all(exp.status.conditions, wants, generation=exp.generation, now=stamp, drop=drop)
    conditions = apply_all(conditions, experiment_summary(conditions), generation=exp.generation, now=stamp)
    return OwnedStatus(
        observed_generation=exp.generation,
        phase=experiment_phase(conditions),
        conditions=tuple(_ordered(conditions)),
        placement=verdict.placement,
        restarts=verdict.restarts,
        start_time=verdict.start_time,
        completion_time=verdict.completion_time if verdict.state == "finished" else None,
        promoted=promotion.promoted,
        previous=promotion.previous,
    )


def _ordered(conditions: Sequence[Condition]) -> list[Condition]:
    """A fixed order (summary first), so the list reads the same way on every object."""
    rank = {t: i for i, t in enumerate(CONDITION_ORDER)}
    return sorted(conditions, key=lambda c: rank.get(c.type, len(rank)))


def _unavailable(exp: ExperimentView, pool: PoolContext | None) -> tuple[str, str]:
    """The Placed reason and message of an experiment whose pool cannot take it now."""
    if pool is None or pool.availability == "missing":
        return (
            "PoolNotFound",
            f"spec.poolRef.name: no SharedBasePool {exp.pool!r} in namespace {exp.namespace}",
        )
    reason = "PoolInvalid" if pool.availability == "invalid" else "PoolSuspended"
    return reason, pool.message


def _finish(base: Verdict, outcome: Want, training_reason: str, now: float) -> Verdict:
    """A newly finished experiment: the outcome condition, the slot freed, the completion time stamped."""
    return replace(
        base,
        state="finished",
        placement=None,
        completion_time=base.completion_time or to_rfc3339(now),
        wants=(
            *base.wants,
            outcome,
            Want(PLACED, "False", "Finished", FINISHED_MESSAGE),
            Want(TRAINING, "False", training_reason),
        ),
    )


def _finished(base: Verdict, outcome: Condition, *, training_reason: str, now: float) -> Verdict:
    """An experiment that finished earlier: the same decisions again, so nothing moves."""
    want = Want(outcome.type, "True", outcome.reason, outcome.message)
    return _finish(base, want, training_reason, now)


def _failed(exp: ExperimentView, base: Verdict, reason: str, message: str, now: float) -> Verdict:
    return _finish(base, Want(FAILED, "True", reason, message), reason, now)
