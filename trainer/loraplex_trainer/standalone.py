"""`loraplex train`: one SharedBasePool and its LoRAExperiments, run in one local trainer."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from loraplex_api import (
    LoRAExperiment,
    ManifestError,
    SharedBasePool,
    load_manifests,
    rank_problem,
    reward_memory_problems,
)

from .compare import best, report_run
from .cpus import cpu_budget
from .experiment import Experiment, State
from .loop import Trainer
from .model_host import BaseModel, load_base_model, resolve_device, resolve_dtype
from .report import RunTotals, plot_rewards, write_summary
from .rewards.sandbox import SandboxConfig, harden_trainer
from .rollout.choice import EngineUnavailable, choose_engine, engine_limits
from .shutdown import GracefulStop
from .tracking import Trackers, TrackingError, build_trackers, hyperparameters

log = logging.getLogger(__name__)


MIN_FREE_BYTES = 16 << 20
"""Free space the run folder needs before the model loads: a few checkpoints of small adapters."""


class SetupError(ValueError):
    """The run cannot start: the manifests do not form one local run, the output folder or the model is unusable."""


def select(files: Sequence[str]) -> tuple[SharedBasePool, list[tuple[LoRAExperiment, Path]]]:
    """Validate the manifests and pick the pool and the experiments that reference it."""
    manifests = load_manifests(files)
    pools = [m.resource for m in manifests if isinstance(m.resource, SharedBasePool)]
    experiments = [(m.resource, m.source.parent) for m in manifests if isinstance(m.resource, LoRAExperiment)]
    if len(pools) != 1:
        found = ", ".join(p.metadata.name for p in pools) or "none"
        raise SetupError(f"loraplex train needs exactly one SharedBasePool in its files (found: {found})")
    pool = pools[0]
    for exp, _ in experiments:
        if exp.spec.pool_ref.name != pool.metadata.name:
            raise SetupError(
                f"LoRAExperiment/{exp.metadata.name}: spec.poolRef.name: {exp.spec.pool_ref.name!r} "
                f"is not the pool in these files ({pool.metadata.name!r})"
            )
        too_large = rank_problem(exp.metadata.name, exp.spec.lora.rank, pool)
        problems = [too_large] if too_large is not None else []
        problems += reward_memory_problems(exp.metadata.name, exp.spec, pool)
        if problems:
            raise SetupError(str(problems[0]))
    if not experiments:
        raise SetupError(f"no LoRAExperiment references pool {pool.metadata.name!r}")
    names = [e.metadata.name for e, _ in experiments]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SetupError(f"LoRAExperiment names must be unique in one run: {', '.join(duplicates)}")
    return pool, experiments


def _eta(exp: Experiment) -> str:
    if exp.state is not State.RUNNING or not exp.history:
        return "-"
    recent = exp.history[-5:]
    per_step = sum(m["seconds"] for m in recent) / len(recent)
    seconds = int(per_step * (exp.total_steps - exp.step))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def progress_table(experiments: Sequence[Experiment], totals: RunTotals, title: str) -> Table:
    """The live display: one row per experiment."""
    table = Table(title=title, expand=False)
    for col in ("experiment", "state", "step", "reward", "reward (5-step mean)", "eval", "ETA", "note"):
        table.add_column(col, justify="right" if col not in ("experiment", "state", "note") else "left")
    for exp in experiments:
        last = exp.history[-1]["reward_mean"] if exp.history else None
        recent = [m["reward_mean"] for m in exp.history[-5:]]
        color = {"Completed": "green", "Failed": "red", "Running": "cyan", "Interrupted": "yellow"}.get(
            exp.state.value, "white"
        )
        table.add_row(
            exp.name,
            f"[{color}]{exp.state.value}[/]",
            f"{exp.step}/{exp.total_steps}",
            "-" if last is None else f"{last:.3f}",
            f"{sum(recent) / len(recent):.3f}" if recent else "-",
            "-" if exp.eval_reward is None else f"{exp.eval_reward:.3f}",
            _eta(exp),
            (exp.message[:60] + "…") if len(exp.message) > 60 else exp.message,
        )
    t = totals.timings
    if totals.steps:
        table.caption = (
            f"{totals.steps} shared steps, {totals.seconds:.0f}s | per step: rollout {t.rollout / totals.steps:.1f}s, "
            f"reward {t.reward / totals.steps:.2f}s, fwd/bwd {t.forward_backward / totals.steps:.1f}s, "
            f"optimizer {t.optimizer / totals.steps:.2f}s, sync {t.sync / totals.steps:.2f}s | "
            f"{totals.rollout_tokens / max(t.rollout, 1e-9):.0f} rollout tok/s"
        )
    return table


def _log_progress(console: Console, experiments: Sequence[Experiment], seconds: float) -> None:
    parts = []
    for exp in experiments:
        reward = f"{exp.history[-1]['reward_mean']:.3f}" if exp.history else "-"
        parts.append(f"{exp.name} {exp.step}/{exp.total_steps} r={reward}")
    console.print(f"step {seconds:.1f}s | " + " | ".join(parts), markup=False, highlight=False)


def reward_sandbox(pool: SharedBasePool) -> SandboxConfig:
    """Harden this process against its reward workers; how to start them (env and the pool's limits)."""
    harden_trainer()
    try:
        return SandboxConfig.from_env().for_pool(pool.spec.trainer.reward_limits)
    except ValueError as exc:
        raise SetupError(str(exc)) from None


def check_output(out: Path) -> Path:
    """The run folder, created and known to be writable with room to spare; SetupError otherwise."""
    where = f"--output {out}"
    if out.exists() and not out.is_dir():
        raise SetupError(f"{where}: is a file; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise SetupError(f"{where}: is not writable ({exc.strerror or exc}); choose another folder") from None
    free = shutil.disk_usage(out).free
    if free < MIN_FREE_BYTES:
        raise SetupError(
            f"{where}: only {free / 2**20:.1f} MiB free; checkpoints and metrics need at least "
            f"{MIN_FREE_BYTES / 2**20:.0f} MiB: free some space or choose another folder"
        )
    return out


def load_pool_model(pool: SharedBasePool, requested_device: str, console: Console) -> BaseModel:
    """The pool's base model; SetupError naming the pool and the URI when it cannot be had."""
    model = pool.spec.model
    device = resolve_device(requested_device)
    dtype = resolve_dtype(model.dtype, device)
    console.print(f"loading {model.uri} ({dtype}, {device}) ...")
    started = time.monotonic()
    try:
        base = load_base_model(model.uri, dtype=dtype, revision=model.revision, device=device)
    except (ValueError, OSError) as exc:  # a missing folder, package or cache entry
        raise SetupError(f"SharedBasePool/{pool.metadata.name}: spec.model.uri: {exc}") from None
    console.print(
        f"loaded {model.name}: {base.facts.parameter_count / 1e6:.1f}M parameters "
        f"in {time.monotonic() - started:.1f}s"
    )
    return base


def train(args: argparse.Namespace) -> int:
    """Entry point of `loraplex train`; returns the process exit code."""
    console = Console(stderr=True)
    logging.basicConfig(
        level=logging.INFO if args.no_live else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        pool, specs = select(args.files)
        sandbox = reward_sandbox(pool)
        out = check_output(Path(args.output))
        trackers = build_trackers(
            getattr(args, "report_to", None) or ["none"], out / "tracking", pool.metadata.name
        )
        # From here on a signal checkpoints and exits 0; before, there is nothing to save.
        stop = GracefulStop().install()
        import torch

        # Intra-op threads that compete with other processes for the cores spin at every
        # barrier; on a busy 2-core machine one thread was 5-19x faster than two. By default:
        # no more than the process may really use (affinity, container quota).
        torch.set_num_threads(args.threads or min(torch.get_num_threads(), cpu_budget()))
        kind = choose_engine(pool.spec.trainer.rollout_engine, resolve_device(args.device))
        base = load_pool_model(pool, args.device, console)
    except EngineUnavailable as exc:
        print(f"SharedBasePool/{pool.metadata.name}: {exc}", file=sys.stderr)
        return 1
    except ManifestError as exc:
        for problem in exc.problems:  # one unwrapped line each, greppable
            print(problem, file=sys.stderr)
        return 1
    except (SetupError, TrackingError) as exc:
        print(exc, file=sys.stderr)
        return 1

    if kind == "vllm":  # vLLM logs to stdout: under the live table, only what needs reading
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if args.no_live else "WARNING")
    # One process hosts the whole run: the engine needs room for all of it, whatever one replica's
    # is (ranks are already checked against capacity.maxLoRARank).
    limits = engine_limits(pool)
    limits = dataclasses.replace(limits, max_adapters=max(limits.max_adapters, len(specs)))
    trainer = Trainer(base, sandbox=sandbox, engine_kind=kind, engine_limits=limits)
    experiments = []
    for resource, base_dir in specs:
        spec = resource.spec
        if args.max_steps is not None:
            spec = spec.model_copy(
                update={"algorithm": spec.algorithm.model_copy(update={"max_steps": args.max_steps})}
            )
        exp = Experiment(name=resource.metadata.name, spec=spec, out_dir=out / resource.metadata.name)
        experiments.append(exp)
        trainer.add(exp, base_dir=base_dir)
        # The run folder is the run's identity: a rerun with it resumes the same tracker runs.
        trackers.start(exp.name, str(exp.out_dir.resolve()), exp.step, hyperparameters(spec))

    totals = RunTotals(rollout_engine=kind, model_name=pool.spec.model.name, model_uri=pool.spec.model.uri)
    title = f"loraplex train: {pool.metadata.name} ({pool.spec.model.uri}, {kind} rollouts)"
    try:
        _train_until_done(
            trainer, experiments, totals, stop, out, console, title, live=not args.no_live, trackers=trackers
        )
    except OSError as exc:  # the disk filled up, the folder went read-only: every experiment stops
        path = exc.filename or out
        print(
            f"{path}: {exc.strerror or exc}; the run stopped. Fix it and run again with the same "
            "--output: every experiment resumes from its last checkpoint",
            file=sys.stderr,
        )
        return 1
    finally:
        for exp in experiments:
            if exp.state is State.RUNNING:  # an error is on its way out: free the workers
                trainer.remove(exp.name)
        trainer.engine.close()
        for exp in experiments:
            trackers.finish(exp.name, exp.state.value)
        trackers.close()
    console.print(progress_table(experiments, totals, title))
    records, drawn = report_run(out, plots=getattr(args, "plots", "rewards"))
    top = best(records)
    if top is not None:
        console.print(f"best by {top.metric}: {top.name} ({top.metric_value():.3f})")
    console.print(
        f"outputs: {out}/<experiment>/{{adapter,checkpoints,metrics.jsonl,reward.png}}, {out}/summary.json"
        + (f", {out}/rewards.png (all experiments)" if drawn else "")
    )
    return 1 if any(e.state is State.FAILED for e in experiments) else 0


def _train_until_done(
    trainer: Trainer,
    experiments: list[Experiment],
    totals: RunTotals,
    stop: GracefulStop,
    out: Path,
    console: Console,
    title: str,
    *,
    live: bool,
    trackers: Trackers,
) -> None:
    """Step until every experiment is done or a signal asks to stop; then checkpoint and summarize."""
    display = Live(progress_table(experiments, totals, title), console=console, refresh_per_second=2)
    with display if live else contextlib.nullcontext():
        while trainer.active and not stop.is_set():
            report = trainer.step()
            totals.add(report)
            for name, row in report.metrics.items():
                trackers.log(name, int(row["step"]), row)
            if live:
                display.update(progress_table(experiments, totals, title))
            else:
                _log_progress(console, experiments, report.seconds)
            write_summary(out, experiments, totals)
    if stop.is_set():
        stopped = trainer.interrupt(stop.reason)
        console.print(
            f"{stop.reason}: checkpointed {len(stopped)} experiment(s); "
            "the next run with the same --output resumes them"
        )
    for exp in experiments:
        plot_rewards(exp)
    write_summary(out, experiments, totals)
