"""The headline measure: N experiments trained together in one trainer vs. one after another.

The same experiments (by default the four of examples/quickstart with its pool) are trained two
ways, each a whole `loraplex train --no-live` process timed from spawn to exit:

- ``together``: all N in ONE process, sharing one base model, one rollout and one forward/backward
  per step;
- ``sequential``: one process per experiment, one after another, each loading its own base.

``--copies K`` repeats each experiment K times under new names and new ``algorithm.seed`` values;
``--steps S`` sets every ``algorithm.maxSteps`` (evaluation and checkpoints no rarer than the last
step, so a final eval reward exists); ``--repeats R`` interleaves the modes (together, sequential,
together, ...) and reports medians. Manifests and run folders live in a temporary folder.

Prints each process's wall and CPU seconds (getrusage of the children) and the 1-minute load
before and after it, both modes' wall seconds and their ratio (target: sequential / together >= 1.8),
the seconds by phase that each run's summary.json records, and the mean final eval reward of both
modes. Exits 1 when the concurrent mean falls more than 0.1 below the sequential one (the reward
check); the speed ratio is reported, not enforced.
Usage: ``python bench/bench_experiments.py [--copies K] [--steps S] [--threads T] [--repeats R] [--short]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "examples" / "quickstart"
LORAPLEX = Path(sys.executable).with_name("loraplex")
PHASES = ("rollout", "reward", "forward_backward", "optimizer", "evaluation", "checkpoint")
OTHER_IN_STEPS = "other, in steps"
OUTSIDE_STEPS = "outside steps (start, load, exit)"
TARGET_RATIO = 1.8
REWARD_TOLERANCE = 0.1
SEED_STRIDE = 1000  # copy k of an experiment trains with algorithm.seed + k * SEED_STRIDE


@dataclass
class Process:
    """One `loraplex train` process: what it cost and what its summary.json says."""

    experiments: list[str]
    wall: float
    cpu: float
    load_before: float
    load_after: float
    phases: dict[str, float]
    eval_rewards: dict[str, float | None]


@dataclass
class Mode:
    """One mode's totals: its processes in one repeat added up, or the medians of those over repeats."""

    wall: float
    cpu: float
    phases: dict[str, float]
    eval_rewards: dict[str, float | None]


# ----------------------------------------------------------------- manifests


def quickstart_experiments(count: int, copies: int, steps: int | None) -> list[dict[str, Any]]:
    """The first ``count`` quickstart experiments, each ``copies`` times, with ``steps`` steps each."""
    originals = [d for d in yaml.safe_load_all((QUICKSTART / "experiments.yaml").read_text()) if d]
    chosen = originals[:count]
    docs = [copy_of(doc, k) for k in range(copies) for doc in chosen]
    return docs if steps is None else [with_steps(doc, steps) for doc in docs]


def copy_of(doc: dict[str, Any], k: int) -> dict[str, Any]:
    """Copy k of an experiment: the original for k = 0, else a new name and a new seed."""
    copy = yaml.safe_load(yaml.safe_dump(doc))
    if k:
        copy["metadata"]["name"] = f"{doc['metadata']['name']}-copy{k}"
        algorithm = copy["spec"]["algorithm"]
        algorithm["seed"] = algorithm.get("seed", 0) + k * SEED_STRIDE
    return copy


def with_steps(doc: dict[str, Any], steps: int) -> dict[str, Any]:
    """The experiment with maxSteps = steps; evaluation and checkpoints at the last step at the latest."""
    spec = doc["spec"]
    spec["algorithm"]["maxSteps"] = steps
    for section in ("evaluation", "checkpoint"):
        every = spec.setdefault(section, {}).get("everySteps", steps)
        spec[section]["everySteps"] = min(every, steps)
    return doc


def quickstart_pool(adapters: int) -> dict[str, Any]:
    """The quickstart pool, with room for ``adapters`` adapters on its one replica."""
    pool = yaml.safe_load((QUICKSTART / "pool.yaml").read_text())
    capacity = pool["spec"]["capacity"]
    capacity["maxAdaptersPerReplica"] = max(capacity.get("maxAdaptersPerReplica", 0), adapters)
    return pool


def write_manifests(folder: Path, pool: dict[str, Any], experiments: list[dict[str, Any]]) -> list[Path]:
    """pool.yaml, experiments.yaml and the quickstart's reward code in ``folder``; the two YAML paths."""
    folder.mkdir(parents=True)
    pool_file, experiments_file = folder / "pool.yaml", folder / "experiments.yaml"
    pool_file.write_text(yaml.safe_dump(pool, sort_keys=False))
    experiments_file.write_text(yaml.safe_dump_all(experiments, sort_keys=False))
    for code in QUICKSTART.glob("*.py"):  # python rewards name their file relative to the manifest
        shutil.copy(code, folder)
    return [pool_file, experiments_file]


# ----------------------------------------------------------------- running


def children_cpu_seconds() -> float:
    """User + system CPU seconds of every child waited for so far (their own children included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def train_process(
    folder: Path, experiments: list[dict[str, Any]], pool: dict[str, Any], threads: int | None
) -> Process:
    """Run one `loraplex train` on these experiments in ``folder``; its cost and its summary."""
    files = write_manifests(folder / "manifests", pool, experiments)
    out = folder / "run"
    argv = [str(LORAPLEX), "train", *map(str, files), "--output", str(out), "--no-live"]
    if threads is not None:
        argv += ["--threads", str(threads)]
    log_path = folder / "train.log"
    load_before, cpu_before = os.getloadavg()[0], children_cpu_seconds()
    started = time.perf_counter()
    with log_path.open("w") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=folder).returncode
    wall = time.perf_counter() - started
    cpu, load_after = children_cpu_seconds() - cpu_before, os.getloadavg()[0]
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(argv)} exited {code}; the end of its log:\n{tail}")
    summary = json.loads((out / "summary.json").read_text())
    names = [doc["metadata"]["name"] for doc in experiments]
    return Process(
        names, wall, cpu, load_before, load_after, phases_of(summary, wall), eval_rewards_of(summary)
    )


def phases_of(summary: dict[str, Any], wall: float) -> dict[str, float]:
    """Seconds by phase from a summary.json, plus what the steps spent elsewhere and what lay outside them."""
    totals = summary["totals"]
    phases = {phase: float(totals["seconds_by_phase"].get(phase, 0.0)) for phase in PHASES}
    phases[OTHER_IN_STEPS] = totals["wall_seconds"] - sum(phases.values())
    phases[OUTSIDE_STEPS] = wall - totals["wall_seconds"]
    return phases


def eval_rewards_of(summary: dict[str, Any]) -> dict[str, float | None]:
    """Each experiment's final eval reward (None when it has none)."""
    return {name: exp["eval_reward"] for name, exp in summary["experiments"].items()}


def print_process(mode: str, process: Process) -> None:
    """One line per process, as soon as it ends: wall, CPU and the load around it."""
    who = (
        process.experiments[0] if len(process.experiments) == 1 else f"{len(process.experiments)} experiments"
    )
    print(
        f"  {mode:<10} {who:<28} wall {process.wall:7.1f}s  cpu {process.cpu:7.1f}s "
        f"({process.cpu / process.wall:4.2f} cores)  load1 {process.load_before:4.2f} -> {process.load_after:4.2f}",
        flush=True,
    )


def add_up(processes: list[Process]) -> Mode:
    """The processes of one mode in one repeat, summed."""
    phases = {phase: sum(p.phases[phase] for p in processes) for phase in processes[0].phases}
    rewards = {name: r for p in processes for name, r in p.eval_rewards.items()}
    return Mode(sum(p.wall for p in processes), sum(p.cpu for p in processes), phases, rewards)


def together(
    folder: Path, experiments: list[dict[str, Any]], pool: dict[str, Any], threads: int | None
) -> Mode:
    """Every experiment in one trainer process."""
    process = train_process(folder, experiments, pool, threads)
    print_process("together", process)
    return add_up([process])


def sequential(
    folder: Path, experiments: list[dict[str, Any]], pool: dict[str, Any], threads: int | None
) -> Mode:
    """Each experiment in its own trainer process, one after another."""
    processes = []
    for doc in experiments:
        process = train_process(folder / doc["metadata"]["name"], [doc], pool, threads)
        print_process("sequential", process)
        processes.append(process)
    return add_up(processes)


# ----------------------------------------------------------------- reporting


def median_mode(modes: list[Mode]) -> Mode:
    """Medians over repeats of wall, CPU and each phase; eval rewards averaged over repeats."""
    names = modes[0].eval_rewards
    rewards = {name: mean_or_none([m.eval_rewards[name] for m in modes]) for name in names}
    phases = {phase: statistics.median(m.phases[phase] for m in modes) for phase in modes[0].phases}
    return Mode(
        statistics.median(m.wall for m in modes), statistics.median(m.cpu for m in modes), phases, rewards
    )


def mean_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def print_phases(tog: Mode, seq: Mode) -> None:
    """The time split of both modes, phase by phase, with the difference."""
    print(f"{'seconds by phase':<36} {'together':>9} {'sequential':>11} {'seq - tog':>10}")
    for phase in tog.phases:
        t, s = tog.phases[phase], seq.phases[phase]
        print(f"  {phase:<34} {t:>9.1f} {s:>11.1f} {s - t:>+10.1f}")
    print(f"  {'total (process wall)':<34} {tog.wall:>9.1f} {seq.wall:>11.1f} {seq.wall - tog.wall:>+10.1f}")
    print(
        f"  {'process CPU (user + system)':<34} {tog.cpu:>9.1f} {seq.cpu:>11.1f} {seq.cpu - tog.cpu:>+10.1f}"
    )


def print_rewards(tog: Mode, seq: Mode) -> bool:
    """Each experiment's final eval reward in both modes and the no-regression line; True when it holds."""
    print(f"{'final eval reward':<36} {'together':>9} {'sequential':>11}")
    for name in seq.eval_rewards:
        t, s = tog.eval_rewards.get(name), seq.eval_rewards[name]
        print(f"  {name:<34} {fmt(t):>9} {fmt(s):>11}")
    t_mean = mean_or_none(list(tog.eval_rewards.values()))
    s_mean = mean_or_none(list(seq.eval_rewards.values()))
    print(f"  {'mean':<34} {fmt(t_mean):>9} {fmt(s_mean):>11}")
    holds = t_mean is not None and s_mean is not None and t_mean >= s_mean - REWARD_TOLERANCE
    verdict = "holds" if holds else "FAILS"
    print(
        f"no regression: together mean {fmt(t_mean)} >= sequential mean {fmt(s_mean)} - {REWARD_TOLERANCE}: "
        f"{verdict}"
    )
    return holds


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiments", type=int, default=4, help="how many of the quickstart's (default 4)")
    parser.add_argument("--copies", type=int, default=1, help="copies of each experiment (new names, seeds)")
    parser.add_argument(
        "--steps", type=int, default=None, help="every experiment's maxSteps (default: its own)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of both modes, interleaved")
    parser.add_argument(
        "--threads", type=int, default=None, help="loraplex train --threads (default: the trainer's)"
    )
    parser.add_argument("--short", action="store_true", help="2 experiments x 3 steps, once (make bench)")
    args = parser.parse_args()
    if args.short:
        args.experiments, args.copies, args.steps, args.repeats = 2, 1, 3, 1
    if not LORAPLEX.exists():
        raise SystemExit(
            f"{LORAPLEX}: not found; run this with the Python of the venv loraplex is installed in"
        )

    experiments = quickstart_experiments(args.experiments, args.copies, args.steps)
    pool = quickstart_pool(len(experiments))
    steps = sorted({doc["spec"]["algorithm"]["maxSteps"] for doc in experiments})
    threads = "the trainer's default" if args.threads is None else args.threads
    print(
        f"{len(experiments)} experiments ({args.experiments} quickstart x {args.copies} copies) x {steps} steps, "
        f"threads={threads}, repeats={args.repeats}, {os.cpu_count()} CPUs, "
        f"load1/5/15 at start {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        flush=True,
    )
    runs: dict[str, list[Mode]] = {"together": [], "sequential": []}
    with tempfile.TemporaryDirectory(prefix="bench-experiments-") as tmp:
        for r in range(args.repeats):
            folder = Path(tmp) / f"repeat-{r}"
            runs["together"].append(together(folder / "together", experiments, pool, args.threads))
            runs["sequential"].append(sequential(folder / "sequential", experiments, pool, args.threads))
    tog, seq = median_mode(runs["together"]), median_mode(runs["sequential"])
    medians = " (medians)" if args.repeats > 1 else ""
    ratio = seq.wall / tog.wall
    print(f"wall seconds{medians}: together {tog.wall:.1f}, sequential {seq.wall:.1f}")
    meets = "meets" if ratio >= TARGET_RATIO else "is below"
    print(f"ratio sequential / together: {ratio:.2f} ({meets} the target {TARGET_RATIO})")
    print_phases(tog, seq)
    if not print_rewards(tog, seq):
        sys.exit(1)


if __name__ == "__main__":
    main()
