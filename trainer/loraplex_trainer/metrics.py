"""The trainer replica's Prometheus metrics (base units, ``_total`` counters, bounded labels).

The ``experiment`` label is bounded by what one replica hosts (``maxAdaptersPerReplica``):
an experiment's series appear when its adapter is added and are removed with it, so a
replica that trains thousands of experiments over its life does not grow the scrape.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .loop import StepReport, Timings

STEP_SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
TOKEN_PHASES = ("rollout", "train")
STEP_PHASES = tuple(f.name for f in fields(Timings))


class TrainerMetrics:
    """The trainer's metrics, registered in one registry (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.steps = Counter(
            "loraplex_trainer_steps",
            "Optimizer steps taken per experiment by this replica.",
            ["experiment"],
            registry=registry,
        )
        self.reward = Gauge(
            "loraplex_trainer_reward",
            "Mean reward of the experiment's last step's rollouts.",
            ["experiment"],
            registry=registry,
        )
        self.tokens = Counter(
            "loraplex_trainer_tokens",
            "Tokens processed: generated in rollouts, or run through the training forward/backward.",
            ["phase"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "loraplex_trainer_step_seconds",
            "Wall time of one shared step of every active adapter.",
            buckets=STEP_SECONDS_BUCKETS,
            registry=registry,
        )
        self.eval_reward = Gauge(
            "loraplex_trainer_eval_reward",
            "Mean reward of the experiment's last greedy evaluation on its eval rows.",
            ["experiment"],
            registry=registry,
        )
        self.phase_seconds = Counter(
            "loraplex_trainer_phase_seconds",
            "Seconds the shared steps spent in each phase (rollout, reward, forward_backward, "
            "optimizer, sync, evaluation, checkpoint); rate() is the share of wall time.",
            ["phase"],
            registry=registry,
        )
        self.logprob_diff = Gauge(
            "loraplex_trainer_logprob_diff",
            "Gap between the rollout engine's and the trainer's log-probs of the last step's tokens "
            "(stat: mean or max of |difference|).",
            ["experiment", "stat"],
            registry=registry,
        )
        self.adapters = Gauge(
            "loraplex_trainer_adapters", "Adapters training on this replica.", registry=registry
        )
        self.memory = Gauge(
            "loraplex_trainer_memory_bytes",
            "Memory in use: process_resident, base_model, adapters, accelerator_allocated, accelerator_reserved.",
            ["kind"],
            registry=registry,
        )
        for phase in TOKEN_PHASES:  # both series exist from the start, so rate() works at once
            self.tokens.labels(phase=phase)
        for phase in STEP_PHASES:
            self.phase_seconds.labels(phase=phase)

    def track(self, experiment: str) -> None:
        """Start the series of an added experiment (its step counter at 0)."""
        self.steps.labels(experiment=experiment)

    def observe_step(self, report: StepReport) -> None:
        """Record one shared step: its time and tokens, and each experiment that completed it."""
        self.step_seconds.observe(report.seconds)
        self.tokens.labels(phase="rollout").inc(report.rollout_tokens)
        self.tokens.labels(phase="train").inc(report.train_tokens)
        for phase, seconds in asdict(report.timings).items():
            self.phase_seconds.labels(phase=phase).inc(max(0.0, float(seconds)))
        for experiment, metrics in report.metrics.items():
            self.steps.labels(experiment=experiment).inc()
            self.reward.labels(experiment=experiment).set(float(metrics["reward_mean"]))
            if "eval_reward" in metrics:
                self.eval_reward.labels(experiment=experiment).set(float(metrics["eval_reward"]))
            for stat in ("mean", "max"):
                value = float(metrics.get(f"logprob_diff_{stat}", 0.0))
                self.logprob_diff.labels(experiment=experiment, stat=stat).set(value)

    def forget(self, experiment: str) -> None:
        """Remove every series of an experiment whose adapter left this replica."""
        for metric in (self.steps, self.reward, self.eval_reward):
            # The reward series exists only after a first step; removing a missing one is fine.
            with contextlib.suppress(KeyError):
                metric.remove(experiment)
        for stat in ("mean", "max"):
            with contextlib.suppress(KeyError):
                self.logprob_diff.remove(experiment, stat)

    def set_memory(self, usage: Mapping[str, int]) -> None:
        """Set the memory gauges of the kinds measured (a kind not measurable here is left out)."""
        for kind, value in usage.items():
            self.memory.labels(kind=kind).set(value)


def resident_bytes() -> int:
    """The process's resident memory now (Linux), else its peak (the only figure other systems give)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes held by some tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def accelerator_bytes() -> dict[str, int]:
    """Allocated and reserved CUDA memory, when a GPU is in use."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {
        "accelerator_allocated": int(torch.cuda.memory_allocated()),
        "accelerator_reserved": int(torch.cuda.memory_reserved()),
    }
