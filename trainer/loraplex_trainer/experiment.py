"""One experiment inside a trainer: its spec, data, reward, adapter optimizer, progress and fate."""

from __future__ import annotations

import enum
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex_api import LoRAExperimentSpec

from .datasets import PromptSampler, Splits, load_dataset
from .multilora import AdapterConfig
from .optim import AdapterOptimizer, OptimizerConfig
from .rewards import Reward, build_reward
from .rewards.sandbox import SandboxConfig

log = logging.getLogger(__name__)


class State(str, enum.Enum):
    """Where an experiment is in its life, as the trainer sees it (status.training.state)."""

    LOADING = "Loading"
    RUNNING = "Running"
    INTERRUPTED = "Interrupted"
    """Stopped by a signal after a checkpoint of its current step; the next run resumes it."""
    COMPLETED = "Completed"
    FAILED = "Failed"


def request_seed(seed: int, step: int, index: int) -> int:
    """A per-row sampling seed from (experiment seed, step, row): stable across restarts and batch mixes."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Experiment:
    """The mutable state of one experiment while its trainer runs it."""

    name: str
    spec: LoRAExperimentSpec
    out_dir: Path
    splits: Splits | None = None
    reward: Reward | None = None
    optimizer: AdapterOptimizer | None = None
    sampler: PromptSampler | None = None
    state: State = State.LOADING
    message: str = ""
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    eval_reward: float | None = None
    wall_seconds: float = 0.0  # training time accumulated over all runs (resumes add to it)
    pinned_revisions: frozenset[str] = frozenset()
    """Checkpoint folders something points to (candidate, promoted, previous): never pruned."""

    @property
    def active(self) -> bool:
        """Whether the experiment takes part in the next step."""
        return self.state is State.RUNNING

    @property
    def total_steps(self) -> int:
        return self.spec.algorithm.max_steps

    @property
    def checkpoint_root(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def adapter_config(self) -> AdapterConfig:
        lora = self.spec.lora
        return AdapterConfig(
            rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.targets
        )

    @property
    def optimizer_config(self) -> OptimizerConfig:
        opt = self.spec.optimizer
        return OptimizerConfig(
            learning_rate=opt.learning_rate,
            betas=(opt.betas[0], opt.betas[1]),
            eps=opt.eps,
            weight_decay=opt.weight_decay,
            max_grad_norm=opt.max_grad_norm,
        )

    def load_inputs(
        self,
        base_dir: Path,
        config_maps: Mapping[tuple[str, str], str] | None,
        *,
        sandbox: SandboxConfig | None = None,
        uid: int | None = None,
    ) -> None:
        """Read the dataset and build the reward; raises DatasetError / RewardError with a clear message.

        A Python reward's worker starts in ``sandbox``, as ``uid`` when the trainer has one for it.
        """
        self.splits = load_dataset(self.spec.dataset, base_dir=base_dir, config_maps=config_maps)
        self.sampler = PromptSampler(len(self.splits.train), self.spec.algorithm.seed)
        self.reward = build_reward(
            self.spec.reward,
            base_dir=base_dir,
            config_maps=config_maps,
            answer_field=self.spec.dataset.answer_field,
            sandbox=sandbox,
            uid=uid,
        )

    def fail(self, message: str) -> None:
        """Mark the experiment failed; the trainer removes its adapter and the others train on."""
        self.state = State.FAILED
        self.message = message
        log.warning("event=experiment_failed experiment=%s step=%d message=%s", self.name, self.step, message)

    def record(self, metrics: dict[str, Any]) -> None:
        """Append one step's metrics to the history and to metrics.jsonl."""
        self.history.append(metrics)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with (self.out_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(metrics) + "\n")

    def truncate_history(self, step: int) -> None:
        """Forget metrics after ``step`` (a resumed run repeats them), in memory and on disk.

        A line a crash cut short (or anything else that is not one JSON object) is dropped with a
        warning, so a damaged tail never stops a resume.
        """
        path = self.out_dir / "metrics.jsonl"
        self.history = []
        if not path.exists():
            return
        dropped = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                metrics = json.loads(line)
            except ValueError:
                dropped += bool(line.strip())
                continue
            if isinstance(metrics, dict) and isinstance(metrics.get("step"), int) and metrics["step"] <= step:
                self.history.append(metrics)
            elif not isinstance(metrics, dict):
                dropped += 1
        if dropped:
            log.warning(
                "event=metrics_truncated experiment=%s path=%s dropped_lines=%d", self.name, path, dropped
            )
        path.write_text("".join(json.dumps(m) + "\n" for m in self.history))

    def close(self) -> None:
        """Stop the reward worker, if any."""
        if self.reward is not None:
            self.reward.close()
            self.reward = None
