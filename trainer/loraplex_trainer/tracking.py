"""Experiment tracking: per-experiment scalars to TensorBoard and MLflow (``--report-to``, TRL's words).

Every experiment is its own run, named after the experiment, so TensorBoard's run selector and
MLflow's run table compare them side by side. Each step logs the scalars of ``SCALARS`` that the
step's metrics row has (eval reward only on eval steps), at the experiment's own step number.

- ``tensorboard``: event files under ``<dir>/<experiment>/`` (``torch.utils.tensorboard``;
  needs the ``tensorboard`` package, extra ``loraplex[tensorboard]``).
- ``mlflow``: one MLflow run per experiment in the MLflow experiment named after the pool, on
  ``MLFLOW_TRACKING_URI`` (a tracking server, or ``sqlite:///...``; default ``<dir>/mlruns``,
  a local file store, which MLflow 3 keeps in maintenance mode); needs ``mlflow``
  or ``mlflow-skinny`` (extra ``loraplex[mlflow]``). MLflow's client is used without its
  process-global active run, so runs of many experiments never mix.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

REPORT_TO = ("tensorboard", "mlflow", "none")
SCALARS = {
    # metrics.jsonl key -> the scalar's name in the trackers
    "reward_mean": "reward/mean",
    "reward_std": "reward/std",
    "eval_reward": "reward/eval",
    "loss": "train/loss",
    "kl": "train/kl",
    "completion_length": "train/completion_length",
    "grad_norm": "train/grad_norm",
    "tokens_per_second": "perf/tokens_per_second",
    "seconds": "perf/step_seconds",
}


class TrackingError(Exception):
    """A tracker that cannot be used here, said in one line (which extra to install)."""


class Tracker(Protocol):
    def start(self, experiment: str, key: str, step: int, params: Mapping[str, str]) -> None: ...

    def log(self, experiment: str, step: int, row: Mapping[str, Any]) -> None: ...

    def finish(self, experiment: str, state: str) -> None: ...

    def close(self) -> None: ...


def hyperparameters(spec: Any) -> dict[str, str]:
    """What tells one experiment of a sweep from another: LoRA shape, optimizer, GRPO settings, reward."""
    algorithm, optimizer, lora = spec.algorithm, spec.optimizer, spec.lora
    reward = spec.reward
    kind = next((k for k in ("builtin", "python", "http", "terms") if getattr(reward, k, None)), "?")
    values = {
        "lora.rank": lora.rank, "lora.alpha": lora.alpha, "lora.dropout": lora.dropout,
        "lora.targetModules": lora.target_modules if isinstance(lora.target_modules, str) else ",".join(lora.target_modules),
        "optimizer.learningRate": optimizer.learning_rate, "optimizer.weightDecay": optimizer.weight_decay,
        "algorithm.groupSize": algorithm.group_size, "algorithm.promptsPerStep": algorithm.prompts_per_step,
        "algorithm.maxSteps": algorithm.max_steps, "algorithm.temperature": algorithm.temperature,
        "algorithm.klCoef": algorithm.kl_coef, "algorithm.lossAggregation": algorithm.loss_aggregation,
        "algorithm.seed": algorithm.seed, "reward": kind,
    }  # fmt: skip
    return {key: str(value) for key, value in values.items()}


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The tracked scalars of one metrics.jsonl row (tokens/s derived from tokens and seconds)."""
    values = dict(row)
    if row.get("tokens") is not None and row.get("seconds"):
        values["tokens_per_second"] = float(row["tokens"]) / float(row["seconds"])
    return {
        name: float(values[key]) for key, name in SCALARS.items() if isinstance(values.get(key), int | float)
    }


class TensorBoardTracker:
    """One event-file folder per experiment under ``root``."""

    def __init__(self, root: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise TrackingError(
                "--report-to tensorboard: the tensorboard package is not installed; "
                "pip install 'loraplex[tensorboard]'"
            ) from exc
        self._writer_class = SummaryWriter
        self.root = root
        self._writers: dict[str, Any] = {}

    def start(self, experiment: str, key: str, step: int, params: Mapping[str, str]) -> None:
        """Open the experiment's writer; a resumed one drops what was logged after its checkpoint."""
        old = self._writers.pop(experiment, None)
        if old is not None:
            old.close()
        purge = {"purge_step": step + 1} if step > 0 else {}
        writer = self._writers[experiment] = self._writer_class(log_dir=str(self.root / experiment), **purge)
        if step == 0:
            table = "| parameter | value |\n| --- | --- |\n" + "".join(
                f"| {k} | {v} |\n" for k, v in params.items()
            )
            writer.add_text("hyperparameters", table, global_step=0)

    def log(self, experiment: str, step: int, row: Mapping[str, Any]) -> None:
        writer = self._writers.get(experiment)
        if writer is None:
            return
        for name, value in scalars(row).items():
            writer.add_scalar(name, value, global_step=step)
        writer.flush()  # a running run is watched while it runs

    def finish(self, experiment: str, state: str) -> None:
        writer = self._writers.pop(experiment, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


MLFLOW_STATUS = {"Completed": "FINISHED", "Failed": "FAILED"}
"""An experiment's end state -> its MLflow run status (anything else: KILLED)."""


class MLflowTracker:
    """One MLflow run per experiment, found again by its key (run folder or storage folder) on resume."""

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise TrackingError(
                "--report-to mlflow: the mlflow package is not installed; pip install 'loraplex[mlflow]'"
            ) from exc
        self._metric, self._param = Metric, Param
        self.client = MlflowClient(tracking_uri=tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment_name)
            if found is None:
                try:
                    self.experiment_id = self.client.create_experiment(experiment_name)
                except Exception:  # another replica created it first
                    found = self.client.get_experiment_by_name(experiment_name)
                    if found is None:
                        raise
            if found is not None:
                self.experiment_id = found.experiment_id
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(f"--report-to mlflow: {tracking_uri}: {_first_line(exc)}") from exc
        self._runs: dict[str, str] = {}
        self._logged_to: dict[str, int] = {}

    def start(self, experiment: str, key: str, step: int, params: Mapping[str, str]) -> None:
        """Find the experiment's run by key, or create it with its parameters."""
        existing = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`loraplex.key` = '{_quoted(key)}'", max_results=1
        )
        if existing:
            run_id = existing[0].info.run_id
            history = self.client.get_metric_history(run_id, SCALARS["reward_mean"])
            # MLflow cannot drop points: steps a crash logged after the checkpoint stay, and are not doubled.
            self._logged_to[experiment] = max((m.step for m in history), default=0)
            self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=experiment,
                tags={"loraplex.key": key, "loraplex.experiment": experiment},
            )
            run_id = run.info.run_id
            self._logged_to[experiment] = 0
            self.client.log_batch(run_id, params=[self._param(k, v) for k, v in params.items()])
        self._runs[experiment] = run_id

    def log(self, experiment: str, step: int, row: Mapping[str, Any]) -> None:
        run_id = self._runs.get(experiment)
        if run_id is None or step <= self._logged_to.get(experiment, 0):
            return
        now = int(time.time() * 1000)
        metrics = [self._metric(name, value, now, step) for name, value in scalars(row).items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        self._logged_to[experiment] = step

    def finish(self, experiment: str, state: str) -> None:
        run_id = self._runs.pop(experiment, None)
        if run_id is not None:
            self.client.set_terminated(run_id, status=MLFLOW_STATUS.get(state, "KILLED"))

    def close(self) -> None:
        for run_id in self._runs.values():
            self.client.set_terminated(run_id, status="KILLED")  # stopped with the process: resumes later
        self._runs.clear()


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


class Trackers:
    """Every tracker asked for, fed together. One that fails is logged and set aside: it never
    stops training, and a tracking server that is away costs one timeout, not one per step."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def start(self, experiment: str, key: str, step: int, params: Mapping[str, str]) -> None:
        for tracker in list(self.trackers):
            self._guard(tracker, experiment, tracker.start, experiment, key, step, params)

    def log(self, experiment: str, step: int, row: Mapping[str, Any]) -> None:
        for tracker in list(self.trackers):
            self._guard(tracker, experiment, tracker.log, experiment, step, row)

    def finish(self, experiment: str, state: str) -> None:
        for tracker in list(self.trackers):
            self._guard(tracker, experiment, tracker.finish, experiment, state)

    def close(self) -> None:
        for tracker in list(self.trackers):
            self._guard(tracker, "-", tracker.close)
        self.trackers.clear()

    def _guard(self, tracker: Tracker, experiment: str, call: Any, *args: Any) -> None:
        try:
            call(*args)
        except Exception as exc:  # a tracking server away must not fail training
            logging.getLogger(__name__).warning(
                "event=tracking_failed tracker=%s experiment=%s error=%r; no more reports to it",
                type(tracker).__name__, experiment, exc,
            )  # fmt: skip
            if tracker in self.trackers:
                self.trackers.remove(tracker)


def build_trackers(names: Sequence[str], folder: Path, run_name: str) -> Trackers:
    """The trackers of ``--report-to`` (or ``spec.trainer.reportTo``), writing under ``folder``."""
    chosen = [n for n in dict.fromkeys(names) if n != "none"]
    for name in chosen:
        if name not in REPORT_TO:
            raise TrackingError(f"--report-to {name}: not one of {', '.join(REPORT_TO)}")
    trackers: list[Tracker] = []
    if "tensorboard" in chosen:
        trackers.append(TensorBoardTracker(folder / "tensorboard"))
    if "mlflow" in chosen:
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # A local file store needs no database; MLflow 3 keeps it (in maintenance mode) on request.
            uri = (folder / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # A server that is away: a short wait, then the tracker is set aside (Trackers), not 7 retries per call.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        trackers.append(MLflowTracker(uri, run_name))
    return Trackers(trackers)
