"""`loraplex agent`: the trainer replica inside a SharedBasePool's pod.

Start: read the pool, load its base model once, write the pool's ``status.model``, then
answer ``/readyz``. Until SIGTERM, one loop:

  sync   - every few seconds, list the experiments placed on this replica; hot-add the new
           ones (each resumes from its newest checkpoint) and remove the ones that left
           (re-placed, suspended, finished, deleted) - :mod:`.assignment` decides
  train  - one shared step of every active adapter, or an idle wait when none is active
  report - ``status.training`` of each experiment at most every few seconds and at every
           state change, ``status.adapter.candidate`` after each new checkpoint -
           :mod:`.status_patches` builds the patches

SIGTERM (or SIGINT) stops the loop after the current step; every adapter is then
checkpointed at its step and reported ``Interrupted``, so the next replica resumes it losing
at most the step in flight. A second signal exits at once. Kubernetes access lives in
:mod:`.cluster`.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.config.config_exception import ConfigException
from prometheus_client import CollectorRegistry, start_http_server

from loraplex_api import SharedBasePool, now_rfc3339
from loraplex_api.wire import (
    HEALTH_PORT,
    METRICS_PORT,
    MODEL_URI_ENV,
    POD_NAME_ENV,
    POD_NAMESPACE_ENV,
    POOL_ENV,
    experiment_folder,
)

from .assignment import Assignment, config_map_refs, plan, select
from .checkpoint import list_checkpoints, saved_extra, step_of
from .cluster import API_ERRORS, ClusterClient, StatusWriter
from .cpus import cpu_budget
from .experiment import Experiment, State
from .health import HealthServer
from .loop import Trainer
from .metrics import TrainerMetrics, accelerator_bytes, resident_bytes, tensor_bytes
from .model_host import ModelUnavailable, load_base_model, resolve_device, resolve_dtype
from .rewards.sandbox import SandboxConfig, harden_trainer
from .rollout.choice import EngineUnavailable, choose_engine, engine_limits
from .shutdown import GracefulStop
from .status_patches import (
    candidate_revision,
    experiment_status_patch,
    loading_status,
    pool_model_patch,
    training_status,
)
from .tracking import Trackers, TrackingError, build_trackers, hyperparameters

log = logging.getLogger(__name__)
MODEL_RETRY_MAX_SECONDS = 600.0

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


@dataclass(frozen=True)
class AgentConfig:
    """Who this replica is, where its storage is, and how often it talks to the API server."""

    pool: str
    namespace: str
    replica: str
    storage: Path
    health_port: int | None = HEALTH_PORT
    """None = no health server; 0 = any free port (tests)."""
    metrics_port: int | None = METRICS_PORT
    poll_seconds: float = 3.0
    report_seconds: float = 5.0
    heartbeat_seconds: float = 30.0
    """Well inside the operator's heartbeat grace (120 s by default)."""
    device: str = "auto"
    model_uri: str | None = None
    """Overrides spec.model.uri: the operator mounts pvc:// models and names the folder in $LORAPLEX_MODEL_URI."""
    model_retry_seconds: float = 30.0
    """First wait before loading a model that could not be had again; it doubles up to 10 minutes."""


def config_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> AgentConfig:
    """The agent's configuration from its flags, falling back to the env the operator's pod sets."""
    pool = args.pool or env.get(POOL_ENV)
    if not pool:
        raise ValueError(f"the pool is unknown: pass --pool or set ${POOL_ENV}")
    namespace = args.namespace or env.get(POD_NAMESPACE_ENV)
    if not namespace and SERVICE_ACCOUNT_NAMESPACE.is_file():
        namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    if not namespace:
        raise ValueError(f"the namespace is unknown: pass --namespace or set ${POD_NAMESPACE_ENV}")
    # A StatefulSet pod's hostname is its name, which is what placements name.
    replica = args.replica or env.get(POD_NAME_ENV) or socket.gethostname()
    return AgentConfig(
        pool=pool,
        namespace=namespace,
        replica=replica,
        storage=Path(args.storage),
        health_port=args.health_port or None,
        metrics_port=args.metrics_port or None,
        model_uri=env.get(MODEL_URI_ENV) or None,
    )


@dataclass
class Hosted:
    """An experiment this replica hosts, from its assignment until the API stops assigning it."""

    assignment: Assignment
    experiment: Experiment | None = None
    """None while its inputs cannot be read yet (a ConfigMap that does not exist yet)."""
    waiting: str = ""
    reported_state: str | None = None
    reported_at: float = -math.inf
    candidate_step: int | None = None
    reported: set[str] = field(default_factory=set)
    """Candidate revisions reported since the last poll of the experiments."""
    unsettled: frozenset[str] = frozenset()
    """Those reported before the last poll: the operator may be promoting one whose status that
    poll did not show yet, so pruning keeps them until the next poll."""


class Agent:
    """One trainer replica: hosts the experiments placed on it and reports on them."""

    def __init__(
        self,
        config: AgentConfig,
        cluster: ClusterClient,
        registry: CollectorRegistry,
        *,
        stop: threading.Event | None = None,
        sandbox: SandboxConfig | None = None,
    ) -> None:
        self.config = config
        self.cluster = cluster
        self.registry = registry
        self.metrics = TrainerMetrics(registry)
        self.stop_event = stop or threading.Event()
        self.shutdown = GracefulStop(self.stop_event)
        self.sandbox = sandbox or SandboxConfig()
        self.ready = threading.Event()
        self.writer = StatusWriter(cluster, heartbeat_seconds=config.heartbeat_seconds)
        self.hosted: dict[str, Hosted] = {}
        self.trainer: Trainer | None = None
        self.trackers = Trackers([])
        self.pool: SharedBasePool | None = None
        self.health: HealthServer | None = None
        self.metrics_port: int | None = None
        self._model_status: dict[str, Any] | None = None  # written to the pool until it succeeds
        self._base_bytes = 0
        self._invalid_logged: set[tuple[str, str]] = set()

    def stop(self, reason: str = "stopped") -> None:
        """Stop after the current step, then checkpoint and report every adapter Interrupted."""
        self.shutdown.request(reason)

    # ----------------------------------------------------------------- lifecycle

    def run(self) -> int:
        """Serve health and metrics, load the base model, then train until stopped; the exit code."""
        heartbeat_stop = threading.Event()
        servers = self._start_servers()
        self.writer.start(heartbeat_stop)
        try:
            pool = self._wait_for_pool()
            if pool is None:
                return 0
            self.pool = pool
            self._sync()  # experiments placed before the model is loaded report Loading meanwhile
            self.trainer = self._load_base_model_when_available(pool)
            if self.trainer is None:
                return 0
            self.trackers = self._trackers(pool)
            self.ready.set()
            self._loop()
            self._interrupt()
            return 0
        except Exception:
            log.exception("event=agent_failed pool=%s replica=%s", self.config.pool, self.config.replica)
            return 1
        finally:
            heartbeat_stop.set()
            self.writer.join()
            self._close_adapters()
            if self.trainer is not None:
                self.trainer.engine.close()
            self.trackers.close()
            for stop in servers:
                stop()
            log.info("event=agent_stopped replica=%s", self.config.replica)

    def _start_servers(self) -> list[Callable[[], None]]:
        stops: list[Callable[[], None]] = []
        if self.config.health_port is not None:
            self.health = HealthServer(self.config.health_port, self.ready.is_set).start()
            stops.append(self.health.stop)
        if self.config.metrics_port is not None:
            server, _ = start_http_server(self.config.metrics_port, registry=self.registry)
            self.metrics_port = int(server.server_address[1])
            stops.extend([server.shutdown, server.server_close])
        log.info(
            "event=agent_started pool=%s namespace=%s replica=%s storage=%s health_port=%s metrics_port=%s",
            self.config.pool, self.config.namespace, self.config.replica, self.config.storage,
            self.health.port if self.health else None, self.metrics_port,
        )  # fmt: skip
        return stops

    def _wait_for_pool(self) -> SharedBasePool | None:
        """The pool, read again every poll until it exists (None when stopped first)."""
        while not self.stop_event.is_set():
            try:
                raw = self.cluster.get_pool(self.config.pool)
            except API_ERRORS as exc:
                log.warning("event=pool_read_failed pool=%s error=%s", self.config.pool, exc)
                raw = None
            else:
                if raw is not None:
                    # An unreadable pool is the operator's to report; crash-looping here says it too.
                    return SharedBasePool.model_validate(raw)
                log.warning(
                    "event=pool_not_found pool=%s namespace=%s", self.config.pool, self.config.namespace
                )
            self.stop_event.wait(self.config.poll_seconds)
        return None

    def _load_base_model_when_available(self, pool: SharedBasePool) -> Trainer | None:
        """Load the base model; while it cannot be had, say why on the pool and try again.

        Waiting alive (live, not ready) instead of exiting keeps a missing model, a refused token
        or an unreachable hub from becoming a crash loop; the operator turns the problem written
        here into the pool's ModelAvailable condition. None when stopped meanwhile.
        """
        delay = self.config.model_retry_seconds
        while not self.stop_event.is_set():
            try:
                return self._load_base_model(pool)
            except ModelUnavailable as exc:
                log.error(
                    "event=model_unavailable uri=%s reason=%s retry_in_s=%.0f error=%r",
                    exc.uri, exc.reason, delay, str(exc),
                )  # fmt: skip
                self._write_model_problem(exc)
                self.stop_event.wait(delay)
                delay = min(delay * 2, MODEL_RETRY_MAX_SECONDS)
        return None

    def _write_model_problem(self, exc: ModelUnavailable) -> None:
        problem = {"reason": exc.reason, "message": str(exc)[:1024], "uri": exc.uri, "since": now_rfc3339()}
        try:
            self.cluster.patch_pool_status(self.config.pool, {"status": {"model": {"problem": problem}}})
        except API_ERRORS as error:
            log.warning("event=model_status_failed pool=%s error=%s", self.config.pool, error)

    def _load_base_model(self, pool: SharedBasePool) -> Trainer:
        model = pool.spec.model
        device = resolve_device(self.config.device)
        dtype = resolve_dtype(model.dtype, device)
        uri = self.config.model_uri or model.uri
        try:  # before the model loads: a trainer that cannot run the engine says so at once
            kind = choose_engine(pool.spec.trainer.rollout_engine, device)
        except EngineUnavailable as exc:
            raise ModelUnavailable(uri, "RolloutEngineUnavailable", str(exc)) from exc
        started = time.monotonic()
        base = load_base_model(uri, dtype=dtype, revision=model.revision, device=device)
        self._base_bytes = tensor_bytes([*base.model.parameters(), *base.model.buffers()])
        self._model_status = base.facts.to_status()
        log.info(
            "event=base_model_loaded uri=%s dtype=%s device=%s seconds=%.1f",
            uri, dtype, device, time.monotonic() - started,
        )  # fmt: skip
        self._model_status["rolloutEngine"] = kind
        self._write_model_status()
        return Trainer(
            base,
            sandbox=self.sandbox.for_pool(pool.spec.trainer.reward_limits),
            engine_kind=kind,
            engine_limits=engine_limits(pool),
        )

    def _loop(self) -> None:
        next_sync = 0.0
        while not self.stop_event.is_set():
            if time.monotonic() >= next_sync:
                self._sync()
                next_sync = time.monotonic() + self.config.poll_seconds
            assert self.trainer is not None
            if self.trainer.active:
                self._step(self.trainer)
            else:
                self.stop_event.wait(max(0.0, next_sync - time.monotonic()))
            self._report_all()

    def _interrupt(self) -> None:
        """Checkpoint every training adapter at its step and report it Interrupted (a drain, a scale-down)."""
        if self.trainer is None:
            return
        for exp in self.trainer.interrupt(self.shutdown.reason or "stopped"):
            hosted = self.hosted.get(exp.name)
            if hosted is not None and hosted.experiment is exp:
                self._report(hosted, force=True)  # state Interrupted, and the checkpoint as candidate

    def _close_adapters(self) -> None:
        """Free the adapters and stop their reward workers; the checkpoints stay for the next replica."""
        for name in list(self.hosted):
            self._drop(name, reason="agent stopping")

    # ----------------------------------------------------------------- sync

    def _sync(self) -> None:
        """Make the hosted experiments match the ones placed here."""
        if self._model_status is not None:
            self._write_model_status()
        try:
            raws = self.cluster.list_experiments(self.config.replica)
        except API_ERRORS as exc:
            log.warning("event=list_failed replica=%s error=%s", self.config.replica, exc)
            return
        selection = select(raws, pool=self.config.pool, replica=self.config.replica)
        for name, problem in selection.invalid.items():
            if (name, problem) not in self._invalid_logged:
                self._invalid_logged.add((name, problem))
                log.warning("event=experiment_unreadable experiment=%s problem=%s", name, problem)
        keys = {n: h.assignment.key for n, h in self.hosted.items()}
        reasons = selection.skipped | {n: f"unreadable: {p}" for n, p in selection.invalid.items()}
        changes = plan(selection.assigned, keys, reasons)
        for name, reason in changes.remove.items():
            self._drop(name, reason=reason)
        for assignment in changes.add:
            candidate = assignment.candidate
            self.hosted[assignment.name] = Hosted(
                assignment, candidate_step=candidate.step if candidate is not None else None
            )
        for assignment in selection.assigned:  # promotion moves on while an adapter trains
            hosted = self.hosted.get(assignment.name)
            if hosted is not None and hosted.experiment is not None:
                hosted.experiment.pinned_revisions = assignment.pinned | hosted.unsettled | hosted.reported
                hosted.unsettled, hosted.reported = frozenset(hosted.reported), set()
        for hosted in list(self.hosted.values()):
            if hosted.experiment is None:
                self._start(hosted)

    def _start(self, hosted: Hosted) -> None:
        """Read the experiment's ConfigMaps and, with the base model loaded, hot-add its adapter."""
        name, spec = hosted.assignment.name, hosted.assignment.spec
        texts, missing = self.cluster.read_config_map_keys(config_map_refs(spec))
        if missing:
            hosted.waiting = "waiting for " + "; ".join(missing)
        elif self.trainer is None:
            hosted.waiting = f"replica {self.config.replica} is loading the base model"
        else:
            hosted.waiting = ""
        if hosted.waiting or self.trainer is None:
            self._report(hosted)
            return
        exp = Experiment(
            name=name,
            spec=spec,
            out_dir=self.config.storage
            / experiment_folder(self.config.namespace, name, hosted.assignment.uid),
            pinned_revisions=hosted.assignment.pinned,
        )
        hosted.experiment = exp
        self._report(hosted, force=True)  # Loading, while data and reward are read
        try:
            self.trainer.add(exp, base_dir=self.config.storage, config_maps=texts)
            self.trackers.start(exp.name, str(exp.out_dir), exp.step, hyperparameters(exp.spec))
        except Exception as exc:  # e.g. a checkpoint that does not fit a changed lora.rank
            log.exception("event=experiment_add_failed experiment=%s", name)
            self._forget_adapter(self.trainer, exp)
            exp.fail(f"loading the adapter on replica {self.config.replica} failed: {exc}")
        if exp.state is State.RUNNING:
            self.metrics.track(name)
        self.metrics.adapters.set(len(self.trainer.active))
        self._report(hosted, force=True)

    def _drop(self, name: str, *, reason: str) -> None:
        """Stop hosting an experiment: no more writes, adapter and optimizer freed, series removed."""
        hosted = self.hosted.pop(name)
        self.writer.forget(name)
        if hosted.experiment is not None and self.trainer is not None:
            self._forget_adapter(self.trainer, hosted.experiment)
        if hosted.experiment is not None:
            self.trackers.finish(name, hosted.experiment.state.value)
        self.metrics.forget(name)
        if self.trainer is not None:
            self.metrics.adapters.set(len(self.trainer.active))
        log.info("event=experiment_removed experiment=%s reason=%r", name, reason)

    @staticmethod
    def _forget_adapter(trainer: Trainer, exp: Experiment) -> None:
        if trainer.experiments.get(exp.name) is exp:
            trainer.remove(exp.name)
        exp.close()  # an experiment the trainer already removed (finished) has nothing left to free

    # ----------------------------------------------------------------- train

    def _trackers(self, pool: SharedBasePool) -> Trackers:
        """spec.trainer.reportTo's trackers, writing under the storage; none (logged) if they cannot run here."""
        folder = self.config.storage / "tracking" / self.config.namespace
        try:
            run_name = f"{self.config.namespace}/{self.config.pool}"  # pool names are unique per namespace
            return build_trackers(pool.spec.trainer.report_to or ["none"], folder, run_name)
        except TrackingError as exc:
            log.error("event=tracking_unavailable pool=%s error=%s", self.config.pool, exc)
            return Trackers([])

    def _step(self, trainer: Trainer) -> None:
        report = trainer.step()
        for name, row in report.metrics.items():
            self.trackers.log(name, int(row["step"]), row)
        self.metrics.observe_step(report)
        self.metrics.adapters.set(len(trainer.active))
        adapters = sum(
            tensor_bytes(trainer.model.adapter_parameters(n)) for n in trainer.model.adapter_names()
        )
        self.metrics.set_memory(
            {"process_resident": resident_bytes(), "base_model": self._base_bytes, "adapters": adapters}
            | accelerator_bytes()
        )

    # ----------------------------------------------------------------- report

    def _report_all(self) -> None:
        for hosted in list(self.hosted.values()):
            self._report(hosted)

    def _report(self, hosted: Hosted, *, force: bool = False) -> None:
        """Write status.training (and a new candidate) when due: on change, else every report period."""
        exp = hosted.experiment
        if exp is None or exp.state is State.LOADING:
            message = hosted.waiting or f"loading the adapter on replica {self.config.replica}"
            training = loading_status(
                total_steps=hosted.assignment.spec.algorithm.max_steps, message=message, now=now_rfc3339()
            )
        else:
            training = training_status(exp, now=now_rfc3339())
        state = f"{training['state']}:{training['message']}"
        candidate = self._new_candidate(hosted)
        finished = training["state"] in ("Completed", "Failed")
        recent = time.monotonic() - hosted.reported_at < self.config.report_seconds
        if not force and candidate is None and state == hosted.reported_state and (finished or recent):
            return
        body = experiment_status_patch(training, candidate)
        try:
            self.writer.write(hosted.assignment.name, body)
        except API_ERRORS as exc:
            log.warning("event=report_failed experiment=%s error=%s", hosted.assignment.name, exc)
            return
        hosted.reported_state, hosted.reported_at = state, time.monotonic()
        if candidate is not None:
            hosted.candidate_step = int(candidate["step"])
            hosted.reported.add(candidate["revision"])
            if hosted.experiment is not None:  # kept from now on, not only from the next poll
                pinned = hosted.experiment.pinned_revisions
                hosted.experiment.pinned_revisions = pinned | {candidate["revision"]}
            log.info(
                "event=candidate experiment=%s revision=%s", hosted.assignment.name, candidate["revision"]
            )

    def _new_candidate(self, hosted: Hosted) -> dict[str, Any] | None:
        """The newest checkpoint as status.adapter.candidate, when it is not the one reported already."""
        exp = hosted.experiment
        if exp is None or self.pool is None:
            return None
        checkpoints = list_checkpoints(exp.checkpoint_root)
        if not checkpoints or checkpoints[-1][0] == hosted.candidate_step:
            return None
        step, path = checkpoints[-1]
        metric = checkpoint_metric(exp.spec.promotion.metric, path, exp.history)
        return candidate_revision(
            path, step=step, metric=metric, storage_root=self.config.storage, storage=self.pool.spec.storage
        )

    def _write_model_status(self) -> None:
        """Patch the pool's status.model (the only pool field a trainer writes); retried at the next sync."""
        assert self._model_status is not None
        try:
            current = self.cluster.get_pool(self.config.pool)
            existing = ((current or {}).get("status") or {}).get("model")
            self.cluster.patch_pool_status(self.config.pool, pool_model_patch(existing, self._model_status))
        except API_ERRORS as exc:
            log.warning("event=model_status_failed pool=%s error=%s", self.config.pool, exc)
            return
        log.info("event=model_status_written pool=%s", self.config.pool)
        self._model_status = None


def checkpoint_metric(metric: str, checkpoint: Path, history: list[dict[str, Any]]) -> float | None:
    """The promotion metric (spec.promotion.metric) of a checkpoint, when it is known.

    ``eval_reward`` is the one the checkpoint itself records; ``reward`` is the step's mean
    rollout reward; any other name is looked up in that step's metrics.
    """
    if metric == "eval_reward":
        value = saved_extra(checkpoint).get("eval_reward")
    else:
        step = step_of(checkpoint)
        at_step: dict[str, Any] = next((m for m in reversed(history) if m.get("step") == step), {})
        value = at_step.get("reward_mean" if metric == "reward" else metric)
    return float(value) if isinstance(value, int | float) else None


def run(args: argparse.Namespace) -> int:
    """Entry point of `loraplex agent`; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = config_from_args(args, os.environ)
    except ValueError as exc:
        log.error("event=agent_config_invalid error=%r", str(exc))
        return 2
    try:
        cluster = ClusterClient(config.namespace)
    except ConfigException as exc:
        log.error("event=kube_config_missing error=%r", str(exc))
        return 1
    harden_trainer()
    import torch

    threads = min(torch.get_num_threads(), cpu_budget())  # the pod's CPU limit, not the node's cores
    torch.set_num_threads(threads)
    log.info("event=torch_threads threads=%d", threads)
    try:
        sandbox = SandboxConfig.from_env()
    except ValueError as exc:
        log.error("event=agent_config_invalid error=%r", str(exc))
        return 2
    agent = Agent(config, cluster, CollectorRegistry(), sandbox=sandbox)
    # Kubernetes sends SIGTERM, then SIGKILL after terminationGracePeriodSeconds: the agent
    # finishes the step in flight, checkpoints every adapter and reports it Interrupted.
    agent.shutdown.install()
    try:
        return agent.run()
    finally:
        cluster.close()
