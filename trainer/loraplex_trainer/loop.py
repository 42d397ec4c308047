"""The concurrent training loop: every active experiment's rows in one rollout and one forward/backward.

One `Trainer.step()` is five phases, each a method that takes and returns a named batch:

  1. rollout   - promptsPerStep x groupSize requests per experiment, one mixed-adapter batch -> Rollouts
  2. reward    - each experiment scores its own completions with its own reward             -> Scored
  3. advantage - group-relative, per prompt                                                   -> TrainBatch
  4. loss      - micro-batched mixed-adapter forward/backward (forward_backward.py)           -> LossReport
  5. optimizer - each adapter's own optimizer                                                 -> grad norms

then, per experiment, the tail: metrics, periodic eval, checkpoint, completion. An experiment
that fails in any phase (its reward raises, its numbers stop being finite) leaves the later
phases of this step; the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import MultiLoRAModel
from .batches import LossReport, Planned, Rollout, Rollouts, Scored, TrainBatch, TrainRow
from .checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    CheckpointState,
    has_checkpoint,
    load_checkpoint,
    resume_point,
    save_checkpoint,
    set_aside,
)
from .datasets import DatasetError, render_prompt
from .experiment import Experiment, State, request_seed
from .forward_backward import forward_backward
from .grpo import group_advantages
from .model_host import BaseModel
from .optim import AdapterOptimizer, NonFiniteError
from .rewards import RewardError, Sample, check_rewards
from .rewards.sandbox import SandboxConfig, UidPool
from .rollout.base import EngineLimits, GenerationRequest, RolloutEngine
from .rollout.choice import EngineKind
from .rollout.torch_engine import TorchRolloutEngine

log = logging.getLogger(__name__)


@dataclass
class Timings:
    """Seconds spent in each phase of one step (summed over experiments sharing it)."""

    rollout: float = 0.0
    reward: float = 0.0
    forward_backward: float = 0.0
    optimizer: float = 0.0
    sync: float = 0.0
    """Pushing the adapters that stepped to an engine that keeps its own copy (vLLM); ~0 for torch."""
    evaluation: float = 0.0
    checkpoint: float = 0.0


@dataclass
class StepReport:
    """What one shared step did."""

    experiments: list[str]
    timings: Timings
    rollout_tokens: int
    train_tokens: int
    seconds: float
    finished: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The metrics each experiment that completed the step recorded (as in its metrics.jsonl)."""


@contextlib.contextmanager
def timed(timings: Timings, phase: str) -> Iterator[None]:
    """Add the seconds spent inside the block to ``timings.<phase>``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        setattr(timings, phase, getattr(timings, phase) + time.perf_counter() - started)


class Trainer:
    """Hosts one frozen base model and trains the adapters of many experiments together."""

    def __init__(
        self,
        base: BaseModel,
        *,
        engine: RolloutEngine | None = None,
        engine_kind: EngineKind = "torch",
        engine_limits: EngineLimits | None = None,
        micro_batch_tokens: int = 4096,
        sandbox: SandboxConfig | None = None,
    ) -> None:
        self.base = base
        self.sandbox = sandbox or SandboxConfig()
        self.reward_uids = UidPool(self.sandbox.uids)
        self.tokenizer = base.tokenizer
        self.model = MultiLoRAModel(base.model)
        if engine is None and engine_kind == "vllm":
            from .rollout.vllm_engine import VLLMRolloutEngine  # vLLM is imported only when chosen

            engine = VLLMRolloutEngine(self.model, base, engine_limits or EngineLimits())
        self.engine: RolloutEngine = engine or TorchRolloutEngine(self.model, base.tokenizer)
        self.micro_batch_tokens = micro_batch_tokens
        self.experiments: dict[str, Experiment] = {}
        """The experiments this trainer holds: added and not removed (finished ones are removed)."""

    # ----------------------------------------------------------------- lifecycle

    def add(
        self,
        experiment: Experiment,
        *,
        base_dir: Path,
        config_maps: Mapping[tuple[str, str], str] | None = None,
    ) -> None:
        """Hot-add an experiment: read its data, build its reward, add its adapter, resume if checkpointed.

        Any problem with the experiment's own inputs fails that experiment only.
        """
        name = experiment.name
        if name in self.experiments:
            raise ValueError(f"experiment {name!r} is already running in this trainer")
        self.experiments[name] = experiment
        try:
            experiment.load_inputs(
                base_dir, config_maps, sandbox=self.sandbox, uid=self.reward_uids.take(name)
            )
            self.model.add_adapter(name, experiment.adapter_config, seed=experiment.spec.algorithm.seed)
        except (DatasetError, RewardError, OSError) as exc:
            experiment.fail(str(exc))
            self.remove(name)
            return
        except ValueError as exc:  # e.g. a target module the base model does not have
            experiment.fail(f"spec.lora.targetModules: {exc}")
            self.remove(name)
            return
        experiment.optimizer = AdapterOptimizer(
            self.model.adapter_parameters(name), experiment.optimizer_config
        )
        try:
            self._resume(experiment)
        except CheckpointError as exc:  # none intact, or one that does not fit a changed spec
            experiment.fail(f"resume: {exc}")
            self.remove(name)
            return
        try:
            self.engine.sync_adapter(name)
        except ValueError as exc:  # more adapters, or a larger rank, than the engine has room for
            experiment.fail(f"rollout engine: {exc}")
            self.remove(name)
            return
        experiment.state = State.RUNNING
        if experiment.step >= experiment.total_steps:
            self._finish(experiment, Timings())
        log.info("event=experiment_added experiment=%s step=%d", name, experiment.step)

    def _resume(self, experiment: Experiment) -> None:
        """Continue from the newest intact checkpoint; damaged ones are set aside on the way."""
        assert experiment.optimizer is not None and experiment.sampler is not None
        while True:
            path = resume_point(experiment.checkpoint_root)
            if path is None:
                experiment.truncate_history(0)
                return
            try:
                state = load_checkpoint(  # resume_point verified its manifest
                    path,
                    model=self.model,
                    adapter=experiment.name,
                    optimizer=experiment.optimizer,
                    verified=True,
                )
                break
            except CheckpointMismatch:
                raise
            except CheckpointError as exc:  # verified, yet unreadable: written by someone else
                set_aside(path, str(exc))
        experiment.step = state.step
        experiment.sampler.load_state_dict(state.sampler)
        experiment.wall_seconds = float(state.extra.get("wall_seconds", 0.0))
        experiment.eval_reward = state.extra.get("eval_reward")
        experiment.truncate_history(state.step)

    def remove(self, name: str) -> None:
        """Forget an experiment: free its adapter, optimizer state and reward worker (any state).

        Completion, failure, suspension and deletion all end here; the experiment object keeps
        its state, history and message for whoever reports on it. Unknown names are ignored.
        """
        experiment = self.experiments.pop(name, None)
        if experiment is None:
            return
        if name in self.model.adapter_names():
            self.model.remove_adapter(name)
            self.engine.remove_adapter(name)
        experiment.optimizer = None
        experiment.close()
        self.reward_uids.give_back(name)

    def interrupt(self, reason: str) -> list[Experiment]:
        """Checkpoint every active experiment at its current step, mark it Interrupted and remove it.

        What a SIGTERM ends with: the next run (or replica) resumes each from this checkpoint, so
        at most the step in flight when the signal came is lost. Returns the experiments stopped.
        """
        stopped = self.active
        timings = Timings()
        for exp in stopped:
            try:
                if exp.step > 0 and not has_checkpoint(exp.checkpoint_root, exp.step):
                    self._checkpoint(exp, timings)
                resumes = f"checkpoint step-{exp.step:08d}" if exp.step > 0 else "the start"
                exp.message = f"{reason} at step {exp.step}; resumes from {resumes}"
            except OSError as exc:  # e.g. the disk filled up: say what is lost, still stop cleanly
                exp.message = (
                    f"{reason} at step {exp.step}; its checkpoint failed ({exc}), resumes from an older one"
                )
                log.error("event=interrupt_checkpoint_failed experiment=%s error=%s", exp.name, exc)
            exp.state = State.INTERRUPTED
            self.remove(exp.name)
        log.info(
            "event=interrupted experiments=%d checkpoint_s=%.2f reason=%r",
            len(stopped),
            timings.checkpoint,
            reason,
        )
        return stopped

    @property
    def active(self) -> list[Experiment]:
        """Experiments that take part in the next step, in a stable order."""
        return [e for _, e in sorted(self.experiments.items()) if e.active]

    # ----------------------------------------------------------------- the step

    def step(self) -> StepReport:
        """One shared GRPO step of every active experiment."""
        # Dropout and unseeded rows draw from the global RNG: seed it from who is training at
        # which step, so a resumed run repeats the uninterrupted one exactly. Forked, so the seed
        # stays inside the step and does not leak into whatever else shares the process.
        cuda_devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(request_seed(0, 0, hash_steps(self.active)))
            return self._step()

    def _step(self) -> StepReport:
        started = time.perf_counter()
        timings = Timings()
        active = self.active
        with timed(timings, "rollout"):
            rollouts = self._rollout(active)
        with timed(timings, "reward"):
            scored = self._reward(active, rollouts)
            batch = self._advantage(scored)
        with timed(timings, "forward_backward"):
            losses = self._loss(batch)
        with timed(timings, "optimizer"):
            grad_norms = self._optimize(active, losses)
        with timed(timings, "sync"):
            for exp in active:
                if exp.active and exp.name in grad_norms:
                    self.engine.sync_adapter(exp.name)
        report = StepReport(
            experiments=[e.name for e in active],
            timings=timings,
            rollout_tokens=rollouts.tokens,
            train_tokens=losses.train_tokens,
            seconds=time.perf_counter() - started,
        )
        self._conclude(active, scored, losses, grad_norms, report)
        report.seconds = time.perf_counter() - started
        log.info(
            "event=step experiments=%d rollout_s=%.2f reward_s=%.2f fwd_bwd_s=%.2f optim_s=%.3f sync_s=%.3f eval_s=%.2f ckpt_s=%.2f tokens=%d",
            len(active), timings.rollout, timings.reward, timings.forward_backward, timings.optimizer,
            timings.sync, timings.evaluation, timings.checkpoint, report.rollout_tokens,
        )  # fmt: skip
        return report

    def _rollout(self, active: Sequence[Experiment]) -> Rollouts:
        """Phase 1: one generation batch holding every active experiment's groups, each row on its adapter."""
        return self._generate(active, {exp.name: self._requests(exp) for exp in active})

    def _generate(self, experiments: Sequence[Experiment], planned: Mapping[str, list[Planned]]) -> Rollouts:
        """Generate every experiment's planned requests in one engine call."""
        flat = [(exp.name, *item) for exp in experiments for item in planned[exp.name]]
        completions = self.engine.generate([req for *_, req in flat]) if flat else []
        of: dict[str, list[Rollout]] = {exp.name: [] for exp in experiments}
        for (name, row, prompt, req), completion in zip(flat, completions, strict=True):
            of[name].append(Rollout(name, row, prompt, req, completion))
        return Rollouts(of)

    def _reward(self, active: Sequence[Experiment], rollouts: Rollouts) -> Scored:
        """Phase 2: each experiment's own reward on its own rollouts; a failure fails that experiment only."""
        scored = Scored(rollouts={}, rewards={})
        for exp in active:
            rows = rollouts.of[exp.name]
            if not all(math.isfinite(lp) for r in rows for lp in r.completion.logprobs):
                exp.fail(
                    f"non-finite log-probabilities in the rollout at step {exp.step + 1}: the adapter diverged"
                )
                continue
            try:
                scored.rewards[exp.name] = self._score(exp, rows)
            except RewardError as exc:
                exp.fail(f"reward: {exc}")
                continue
            scored.rollouts[exp.name] = rows
        return scored

    def _advantage(self, scored: Scored) -> TrainBatch:
        """Phase 3: group-relative advantages per prompt; every scored rollout becomes a training row."""
        rows: list[TrainRow] = []
        for name, rollouts in scored.rollouts.items():
            algo = self.experiments[name].spec.algorithm
            rewards = torch.tensor(scored.rewards[name], dtype=torch.float32)
            grouped = rewards.view(algo.prompts_per_step, algo.group_size)  # rows are prompt-major
            advantages = group_advantages(grouped, scale_by_std=algo.scale_rewards).flatten().tolist()
            for r, advantage in zip(rollouts, advantages, strict=True):
                rows.append(TrainRow(name, algo, r.request.prompt_ids, r.completion, advantage))
        return TrainBatch.build(rows, pad_id=self.tokenizer.pad_token_id, device=self.model.model.device)

    def _loss(self, batch: TrainBatch) -> LossReport:
        """Phase 4: one mixed-adapter forward/backward over the rows, micro-batched to a token budget."""
        if not batch.rows:
            return LossReport({}, {}, 0)
        return forward_backward(
            self.model,
            batch,
            pad_id=self.tokenizer.pad_token_id,
            micro_batch_tokens=self.micro_batch_tokens,
            sampler_logprobs=not self.engine.exact_logprobs,
        )

    def _optimize(self, active: Sequence[Experiment], losses: LossReport) -> dict[str, float]:
        """Phase 5: each adapter's own optimizer step; the gradient norm of each experiment that stepped."""
        grad_norms: dict[str, float] = {}
        for exp in active:
            if not exp.active:
                continue
            assert exp.optimizer is not None
            try:
                loss = losses.losses.get(exp.name, 0.0)
                if not math.isfinite(loss):
                    raise NonFiniteError(f"loss is {loss}")
                grad_norms[exp.name] = exp.optimizer.step()
            except NonFiniteError as exc:
                exp.fail(f"non-finite training signal at step {exp.step + 1}: {exc}")
            exp.optimizer.zero_grad()
        return grad_norms

    def _conclude(
        self,
        active: Sequence[Experiment],
        scored: Scored,
        losses: LossReport,
        grad_norms: Mapping[str, float],
        report: StepReport,
    ) -> None:
        """The tail of a step, per experiment: count the step, record metrics, evaluate, checkpoint, finish."""
        for exp in active:
            if exp.state is State.FAILED:
                self.remove(exp.name)
                continue
            exp.step += 1
            exp.wall_seconds += report.seconds
        stepped = [e for e in active if e.active]
        evals = self._evaluate_due(stepped, report.timings)
        for exp in stepped:
            if not exp.active:  # its reward failed during eval
                continue
            rewards = scored.rewards[exp.name]
            tokens = [len(r.completion.token_ids) for r in scored.rollouts[exp.name]]
            metrics = {
                "step": exp.step,
                "reward_mean": sum(rewards) / len(rewards),
                "reward_std": float(torch.tensor(rewards).std(unbiased=False)),
                "loss": losses.losses.get(exp.name, 0.0),
                "kl": losses.kls.get(exp.name, 0.0),
                "tokens": sum(tokens),
                "completion_length": sum(tokens) / max(len(tokens), 1),
                "grad_norm": grad_norms.get(exp.name, 0.0),
                "logprob_diff_mean": losses.logprob_diff_mean.get(exp.name, 0.0),
                "logprob_diff_max": losses.logprob_diff_max.get(exp.name, 0.0),
                "seconds": report.seconds,
            }
            if exp.name in evals:
                metrics["eval_reward"] = evals[exp.name]
            exp.record(metrics)
            report.metrics[exp.name] = metrics
            if exp.step >= exp.total_steps:
                self._finish(exp, report.timings)
                report.finished.append(exp.name)
            elif exp.step % exp.spec.checkpoint.every_steps == 0:
                self._checkpoint(exp, report.timings)

    # ----------------------------------------------------------------- pieces of the phases

    def _encode(self, exp: Experiment, row: dict[str, Any]) -> tuple[str, list[int]]:
        prompt = render_prompt(row, exp.spec.dataset, self.tokenizer)
        ids = self.tokenizer(prompt, add_special_tokens=not exp.spec.dataset.chat_template)["input_ids"]
        limit = exp.spec.algorithm.max_prompt_tokens
        return prompt, ids[-limit:]  # keep the end: the question usually sits last

    def _requests(self, exp: Experiment) -> list[Planned]:
        """This step's requests of one experiment: promptsPerStep prompts, groupSize seeded rows each."""
        assert exp.splits is not None and exp.sampler is not None
        algo = exp.spec.algorithm
        out = []
        for p, index in enumerate(exp.sampler.next_indices(algo.prompts_per_step)):
            row = exp.splits.train[index]
            prompt, ids = self._encode(exp, row)
            for g in range(algo.group_size):
                request = GenerationRequest(
                    prompt_ids=ids,
                    adapter=exp.name,
                    max_new_tokens=algo.max_new_tokens,
                    temperature=algo.temperature,
                    top_p=algo.top_p,
                    seed=request_seed(algo.seed, exp.step, p * algo.group_size + g),
                )
                out.append((row, prompt, request))
        return out

    def _score(self, exp: Experiment, rollouts: Sequence[Rollout]) -> list[float]:
        assert exp.reward is not None
        samples = [
            Sample(
                prompt=r.prompt,
                completion=str(self.tokenizer.decode(r.completion.token_ids, skip_special_tokens=True)),
                row=r.row,
            )
            for r in rollouts
        ]
        # Weighted terms can add up past any one term's check: the sum is checked too.
        return check_rewards(exp.reward(samples), len(samples), "spec.reward")

    # ----------------------------------------------------------------- eval, checkpoints, completion

    def _evaluate_due(self, experiments: list[Experiment], timings: Timings) -> dict[str, float]:
        due = [
            e for e in experiments
            if (e.spec.evaluation.every_steps and e.step % e.spec.evaluation.every_steps == 0) or e.step >= e.total_steps
        ]  # fmt: skip
        if not due:
            return {}
        with timed(timings, "evaluation"):
            return self.evaluate(due)

    def evaluate(self, experiments: list[Experiment]) -> dict[str, float]:
        """Greedy completions on each experiment's eval rows, all in one batch; mean reward per experiment."""
        planned: dict[str, list[Planned]] = {}
        for exp in experiments:
            assert exp.splits is not None
            planned[exp.name] = []
            for row in exp.splits.eval[: exp.spec.evaluation.samples]:
                prompt, ids = self._encode(exp, row)
                request = GenerationRequest(ids, exp.name, exp.spec.algorithm.max_new_tokens, temperature=0.0)
                planned[exp.name].append((row, prompt, request))
        rollouts = self._generate(experiments, planned)
        results: dict[str, float] = {}
        for exp in experiments:
            if not rollouts.of[exp.name]:
                continue
            try:
                scores = self._score(exp, rollouts.of[exp.name])
            except RewardError as exc:
                exp.fail(f"reward (eval): {exc}")
                self.remove(exp.name)
                continue
            exp.eval_reward = results[exp.name] = sum(scores) / len(scores)
        return results

    def _checkpoint(self, exp: Experiment, timings: Timings) -> Path:
        assert exp.optimizer is not None and exp.sampler is not None
        with timed(timings, "checkpoint"):
            return save_checkpoint(
                exp.checkpoint_root,
                model=self.model,
                adapter=exp.name,
                optimizer=exp.optimizer,
                state=CheckpointState(
                    step=exp.step,
                    sampler=exp.sampler.state_dict(),
                    extra={"wall_seconds": exp.wall_seconds, "eval_reward": exp.eval_reward},
                ),
                base_model_name_or_path=self.base.uri,
                keep_last=exp.spec.checkpoint.keep_last,
                keep=exp.pinned_revisions,
            )

    def _finish(self, exp: Experiment, timings: Timings) -> None:
        self._checkpoint(exp, timings)
        self.model.save_adapter(exp.name, exp.out_dir / "adapter", base_model_name_or_path=self.base.uri)
        exp.state = State.COMPLETED
        exp.message = f"completed {exp.step} steps"
        self.remove(exp.name)
        log.info(
            "event=experiment_completed experiment=%s steps=%d eval_reward=%s",
            exp.name,
            exp.step,
            exp.eval_reward,
        )


def hash_steps(experiments: Sequence[Experiment]) -> int:
    """A stable integer from who trains at which step."""
    text = ",".join(f"{e.name}:{e.step}" for e in experiments)
    return sum((i + 1) * ord(ch) for i, ch in enumerate(text))
