"""What a run leaves behind for people: summary.json, reward curves, and the run's time split."""

from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .experiment import Experiment
from .loop import StepReport, Timings

SMOOTH = 5  # steps averaged for the "first"/"last" reward figures; single steps are noisy


@dataclass
class RunTotals:
    """Totals over every shared step of one run (one process lifetime)."""

    rollout_engine: str = "torch"
    model_name: str | None = None
    model_uri: str | None = None
    steps: int = 0
    seconds: float = 0.0
    rollout_tokens: int = 0
    train_tokens: int = 0
    timings: Timings = field(default_factory=Timings)

    def add(self, report: StepReport) -> None:
        self.steps += 1
        self.seconds += report.seconds
        self.rollout_tokens += report.rollout_tokens
        self.train_tokens += report.train_tokens
        for name in asdict(self.timings):
            setattr(self.timings, name, getattr(self.timings, name) + getattr(report.timings, name))


def peak_memory_bytes() -> dict[str, int]:
    """Peak resident memory of this process and, on CUDA, peak allocated accelerator memory."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"host_rss": rss if sys.platform == "darwin" else rss * 1024}
    try:
        import torch

        if torch.cuda.is_available():
            peak["cuda_allocated"] = int(torch.cuda.max_memory_allocated())
    except ImportError:  # pragma: no cover - the trainer always has torch
        pass
    return peak


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def experiment_summary(exp: Experiment) -> dict[str, Any]:
    """One experiment's line in summary.json."""
    rewards = [m["reward_mean"] for m in exp.history]
    return {
        "state": exp.state.value,
        "message": exp.message,
        "steps": exp.step,
        "total_steps": exp.total_steps,
        "first_reward": rewards[0] if rewards else None,
        "last_reward": rewards[-1] if rewards else None,
        f"first_reward_mean{SMOOTH}": _mean(rewards[:SMOOTH]),
        f"last_reward_mean{SMOOTH}": _mean(rewards[-SMOOTH:]),
        "eval_reward": exp.eval_reward,
        "promotion_metric": exp.spec.promotion.metric,
        "first_eval_reward": next((m["eval_reward"] for m in exp.history if "eval_reward" in m), None),
        "wall_seconds": round(exp.wall_seconds, 3),
    }


def write_summary(out: Path, experiments: list[Experiment], totals: RunTotals) -> dict[str, Any]:
    """Write DIR/summary.json atomically and return it."""
    t = totals.timings
    summary = {
        "model": {"name": totals.model_name, "uri": totals.model_uri},
        "experiments": {e.name: experiment_summary(e) for e in experiments},
        "totals": {
            "experiments": len(experiments),
            "completed": sum(e.state.value == "Completed" for e in experiments),
            "failed": sum(e.state.value == "Failed" for e in experiments),
            "rollout_engine": totals.rollout_engine,
            "shared_steps": totals.steps,
            "wall_seconds": round(totals.seconds, 3),
            "rollout_tokens": totals.rollout_tokens,
            "train_tokens": totals.train_tokens,
            "rollout_tokens_per_second": round(totals.rollout_tokens / t.rollout, 2) if t.rollout else None,
            "train_tokens_per_second": round(totals.train_tokens / t.forward_backward, 2)
            if t.forward_backward
            else None,
            "seconds_by_phase": {k: round(v, 3) for k, v in asdict(t).items()},
            "peak_memory_bytes": peak_memory_bytes(),
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "summary.json")
    return summary


def plot_rewards(exp: Experiment) -> Path | None:
    """Draw DIR/<experiment>/reward.png: reward per step, its moving average and eval points."""
    if not exp.history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in exp.history]
    rewards = [m["reward_mean"] for m in exp.history]
    smooth = [sum(rewards[max(0, i - SMOOTH + 1) : i + 1]) / min(i + 1, SMOOTH) for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, rewards, color="#9ecae1", linewidth=1, label="train reward (step mean)")
    ax.plot(steps, smooth, color="#08519c", linewidth=2, label=f"moving mean ({SMOOTH} steps)")
    evals = [(m["step"], m["eval_reward"]) for m in exp.history if "eval_reward" in m]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o", color="#e6550d", label="eval reward (greedy)")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title(exp.name)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path = exp.out_dir / "reward.png"
    fig.savefig(path)
    plt.close(fig)
    return path
