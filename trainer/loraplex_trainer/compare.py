"""A run's experiments side by side: one reward chart, a sheet of small multiples, the best experiment.

Everything here reads only the run folder (``summary.json`` and each ``<experiment>/metrics.jsonl``),
so ``loraplex report RUN_DIR`` draws the same charts and table for a finished run, a running one
(a line is appended to metrics.jsonl after every step) or one copied off a cluster's storage.

- ``rewards.png``: every experiment's reward (moving mean over ``SMOOTH`` steps) as a line and
  its eval rewards as dots of the same colour; the legend sorted by final eval reward, best
  first. ``rewards.json`` beside it says what was drawn (legend order, colours, points).
- ``metrics.png`` (``--plots all``): one row per experiment, one column each for reward, KL,
  completion length and grad norm.
- The best experiment is the one with the highest value of the run's promotion metric
  (``spec.promotion.metric``, default ``eval_reward``): its final eval reward, its mean reward
  over the last ``SMOOTH`` steps for ``reward``, else its last value of that metric. Only
  experiments judged by the same metric are ranked together (the one most of them use, ties
  to ``eval_reward``). Auto promotion instead compares one experiment's checkpoints with each
  other, by the value each checkpoint recorded.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from .report import SMOOTH

SHEET = (
    ("reward_mean", "reward"),
    ("kl", "KL"),
    ("completion_length", "completion length"),
    ("grad_norm", "grad norm"),
)


class RunFolderError(Exception):
    """A folder that is not a loraplex run, said in one line."""


@dataclass
class ExperimentRecord:
    """One experiment as its files tell it."""

    name: str
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return str(self.summary.get("promotion_metric") or "eval_reward")

    def metric_value(self) -> float | None:
        """Its promotion metric: the final eval reward, the recent mean reward, or the last row's value."""
        if self.metric == "eval_reward":
            value = self.summary.get("eval_reward")
            if value is None:
                value = next((r["eval_reward"] for r in reversed(self.rows) if "eval_reward" in r), None)
        elif self.metric == "reward":
            recent = [r["reward_mean"] for r in self.rows[-SMOOTH:]]
            value = sum(recent) / len(recent) if recent else None
        else:
            value = next((r[self.metric] for r in reversed(self.rows) if self.metric in r), None)
        return float(value) if isinstance(value, int | float) and math.isfinite(value) else None

    def final_eval(self) -> float | None:
        value = next((r["eval_reward"] for r in reversed(self.rows) if "eval_reward" in r), None)
        return float(value) if value is not None else None


def read_run(run_dir: Path) -> list[ExperimentRecord]:
    """Every experiment of a run folder, in summary order (then any other folder with metrics)."""
    summary_file = run_dir / "summary.json"
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such folder")
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    names = list(summary.get("experiments") or {})
    names += sorted(p.parent.name for p in run_dir.glob("*/metrics.jsonl") if p.parent.name not in names)
    if not names:
        raise RunFolderError(
            f"{run_dir}: no summary.json and no <experiment>/metrics.jsonl; not a loraplex run"
        )
    records = []
    for name in names:
        rows = []
        metrics = run_dir / name / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line being written right now
                    continue
                # What a report needs of a row; anything else is not loraplex's (as on resume).
                if isinstance(row, dict) and isinstance(row.get("step"), int) and "reward_mean" in row:
                    rows.append(row)
        records.append(ExperimentRecord(name, rows, (summary.get("experiments") or {}).get(name, {})))
    return records


def best(records: list[ExperimentRecord]) -> ExperimentRecord | None:
    """The experiment with the highest value of the run's promotion metric (None when none has one yet)."""
    metrics = [r.metric for r in records]
    if not metrics:
        return None
    metric = max(set(metrics), key=lambda m: (metrics.count(m), m == "eval_reward", m))
    scored = [(value, r) for r in records if r.metric == metric and (value := r.metric_value()) is not None]
    scored.sort(key=lambda pair: pair[1].name)  # a tie goes to the first name, as in the legend
    return max(scored, key=lambda pair: pair[0])[1] if scored else None


def _smooth(values: list[float]) -> list[float]:
    return [sum(values[max(0, i - SMOOTH + 1) : i + 1]) / min(i + 1, SMOOTH) for i in range(len(values))]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(run_dir: Path, records: list[ExperimentRecord]) -> dict[str, Any]:
    """Draw RUN_DIR/rewards.png and write rewards.json (what was drawn); returns the latter."""
    plt = _pyplot()
    ordered = sorted(records, key=lambda r: (r.final_eval() is None, -(r.final_eval() or 0.0), r.name))
    colours = plt.get_cmap("tab10" if len(ordered) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    drawn = []
    for i, record in enumerate(ordered):
        colour = colours(i % colours.N)
        steps = [r["step"] for r in record.rows]
        final = record.final_eval()
        label = f"{record.name} (eval {final:.3f})" if final is not None else f"{record.name} (no eval yet)"
        smooth = _smooth([float(r["reward_mean"]) for r in record.rows])
        ax.plot(steps, smooth, color=colour, linewidth=2, label=label)
        evals = [(r["step"], r["eval_reward"]) for r in record.rows if "eval_reward" in r]
        if evals:
            ax.plot(*zip(*evals, strict=True), "o", color=colour, markersize=5)
        red, green, blue = (int(255 * c) for c in colour[:3])
        drawn.append(
            {
                "experiment": record.name,
                "label": label,
                "colour": f"#{red:02x}{green:02x}{blue:02x}",
                "steps": len(steps),
                "eval_points": len(evals),
                "final_eval": final,
            }
        )
    ax.set_xlabel("step")
    ax.set_ylabel(f"reward (moving mean, {SMOOTH} steps); dots: eval")
    ax.set_title(f"{run_dir.name}: {len(ordered)} experiments")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "rewards.png")
    plt.close(fig)
    top = best(records)
    sidecar = {
        "image": "rewards.png",
        "legend": [d["experiment"] for d in drawn],
        "series": drawn,
        "best": None
        if top is None
        else {"experiment": top.name, "metric": top.metric, "value": top.metric_value()},
    }
    (run_dir / "rewards.json").write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def plot_sheet(run_dir: Path, records: list[ExperimentRecord]) -> Path:
    """Draw RUN_DIR/metrics.png: a row per experiment, a column per SHEET metric."""
    plt = _pyplot()
    rows = max(1, len(records))
    fig, axes = plt.subplots(rows, len(SHEET), figsize=(3 * len(SHEET), 2 * rows), dpi=90, squeeze=False)
    for r, record in enumerate(records):
        steps = [row["step"] for row in record.rows]
        for c, (key, title) in enumerate(SHEET):
            ax = axes[r][c]
            values = [row.get(key) for row in record.rows]
            points = [(s, v) for s, v in zip(steps, values, strict=True) if isinstance(v, int | float)]
            if points:
                ax.plot(*zip(*points, strict=True), linewidth=1.2)
            ax.set_title(f"{record.name}: {title}" if c == 0 else title, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "metrics.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def comparison_table(records: list[ExperimentRecord], title: str) -> Table:
    """The run's experiments, one line each; the caption names the best by its promotion metric."""
    table = Table(title=title)
    for column in (
        "experiment",
        "state",
        "steps",
        f"reward (first {SMOOTH} -> last {SMOOTH})",
        "eval",
        "metric",
    ):
        table.add_column(column, justify="left" if column in ("experiment", "state") else "right")
    top = best(records)
    for record in records:
        rewards = [float(r["reward_mean"]) for r in record.rows]
        first = sum(rewards[:SMOOTH]) / len(rewards[:SMOOTH]) if rewards else None
        last = sum(rewards[-SMOOTH:]) / len(rewards[-SMOOTH:]) if rewards else None
        value = record.metric_value()
        table.add_row(
            ("* " if record is top else "") + record.name,
            str(record.summary.get("state", "-")),
            str(record.rows[-1]["step"] if record.rows else 0),
            "-" if first is None or last is None else f"{first:.3f} -> {last:.3f}",
            "-" if record.final_eval() is None else f"{record.final_eval():.3f}",
            "-" if value is None else f"{record.metric} {value:.3f}",
        )
    if top is not None:
        table.caption = f"best by {top.metric}: {top.name} ({top.metric_value():.3f})"
    return table


def report_run(run_dir: Path, *, plots: str = "rewards") -> tuple[list[ExperimentRecord], dict[str, Any]]:
    """Draw the run's charts (``plots``: ``rewards``, ``all`` or ``none``); returns the records and what was drawn."""
    records = read_run(run_dir)
    drawn: dict[str, Any] = {}
    if plots != "none":
        drawn = plot_comparison(run_dir, records)
    if plots == "all":
        drawn["sheet"] = plot_sheet(run_dir, records).name
    return records, drawn


def report_command(args: Any) -> int:
    """``loraplex report RUN_DIR``: redraw the charts and print the table from the files alone."""
    from rich.console import Console

    run_dir = Path(args.run_dir)
    try:
        records, drawn = report_run(run_dir, plots=args.plots)
    except (RunFolderError, OSError, ValueError) as exc:
        print(f"loraplex report: {exc}", file=sys.stderr)
        return 1
    console = Console()
    console.print(comparison_table(records, f"loraplex report: {run_dir}"))
    for name in ("image", "sheet"):
        if name in drawn:
            console.print(f"drew {run_dir / drawn[name]}")
    return 0
