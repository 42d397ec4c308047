"""The concurrent training loop: every active experiment's rows in one rollout and one forward/backward.

One `Trainer.step()` reads top to bottom:
  1. rollout   - promptsPerStep x groupSize requests per experiment, one mixed-adapter batch
  2. reward    - each experiment scores its own completions with its own reward
  3. advantage - group-relative, per prompt
  4. loss      - micro-batched mixed-adapter forward/backward, each row weighted for its experiment
  5. step      - each adapter's own optimizer
then per experiment: metrics, periodic eval, checkpoint, completion.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from .adapters import MultiLoRAModel
from .checkpoint import CheckpointState, latest_checkpoint, load_checkpoint, save_checkpoint
from .datasets import DatasetError, render_prompt
from .experiment import Experiment, State, request_seed
from .grpo import group_advantages, per_token_loss, row_weights, token_logprobs
from .model_host import BaseModel
from .optim import AdapterOptimizer, NonFiniteError
from .prefill import prefill_prompts
from .rewards import RewardError, Sample
from .rollout.base import Completion, GenerationRequest, RolloutEngine
from .rollout.torch_engine import TorchRolloutEngine

log = logging.getLogger(__name__)


@dataclass
class Timings:
    """Seconds spent in each phase of one step (summed over experiments sharing it)."""

    rollout: float = 0.0
    reward: float = 0.0
    forward_backward: float = 0.0
    optimizer: float = 0.0
    evaluation: float = 0.0
    checkpoint: float = 0.0

    @property
    def total(self) -> float:
        return (
            self.rollout
            + self.reward
            + self.forward_backward
            + self.optimizer
            + self.evaluation
            + self.checkpoint
        )


@dataclass
class StepReport:
    """What one shared step did."""

    experiments: list[str]
    timings: Timings
    rollout_tokens: int
    train_tokens: int
    seconds: float
    finished: list[str] = field(default_factory=list)


@dataclass
class _Row:
    """One sampled completion on its way to the loss."""

    experiment: str
    prompt_ids: list[int]
    completion: Completion
    advantage: float = 0.0


class Trainer:
    """Hosts one frozen base model and trains the adapters of many experiments together."""

    def __init__(
        self,
        base: BaseModel,
        *,
        engine: RolloutEngine | None = None,
        micro_batch_tokens: int = 4096,
    ) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.model = MultiLoRAModel(base.model)
        self.engine: RolloutEngine = engine or TorchRolloutEngine(self.model, base.tokenizer)
        self.micro_batch_tokens = micro_batch_tokens
        self.experiments: dict[str, Experiment] = {}

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
        if name in self.experiments and self.experiments[name].state in (State.RUNNING, State.LOADING):
            raise ValueError(f"experiment {name!r} is already running in this trainer")
        self.experiments[name] = experiment
        try:
            experiment.load_inputs(base_dir, config_maps)
            self.model.add_adapter(name, experiment.adapter_config, seed=experiment.spec.algorithm.seed)
        except (DatasetError, RewardError, OSError) as exc:
            experiment.fail(str(exc))
            experiment.close()
            return
        except ValueError as exc:  # e.g. a target module the base model does not have
            experiment.fail(f"spec.lora.targetModules: {exc}")
            experiment.close()
            return
        experiment.optimizer = AdapterOptimizer(
            self.model.adapter_parameters(name), experiment.optimizer_config
        )
        self._resume(experiment)
        experiment.state = State.RUNNING
        self.engine.sync_adapter(name)
        if experiment.step >= experiment.total_steps:
            self._finish(experiment, Timings())
        log.info("event=experiment_added experiment=%s step=%d", name, experiment.step)

    def _resume(self, experiment: Experiment) -> None:
        path = latest_checkpoint(experiment.checkpoint_root)
        if path is None:
            experiment.truncate_history(0)
            return
        assert experiment.optimizer is not None and experiment.sampler is not None
        state = load_checkpoint(
            path, model=self.model, adapter=experiment.name, optimizer=experiment.optimizer
        )
        experiment.step = state.step
        experiment.sampler.load_state_dict(state.sampler)
        experiment.wall_seconds = float(state.extra.get("wall_seconds", 0.0))
        experiment.eval_reward = state.extra.get("eval_reward")
        experiment.truncate_history(state.step)

    def remove(self, name: str) -> None:
        """Remove an experiment's adapter and optimizer state (completion, failure, suspension, deletion)."""
        experiment = self.experiments[name]
        if name in self.model.adapter_names():
            self.model.remove_adapter(name)
            self.engine.remove_adapter(name)
        experiment.optimizer = None
        experiment.close()

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

        # 1. rollout: one batch with the rows of every experiment, each row on its own adapter
        t = time.perf_counter()
        requests, owners = [], []
        for exp in active:
            for req, owner in self._requests(exp):
                requests.append(req)
                owners.append(owner)
        completions = self.engine.generate(requests)
        timings.rollout = time.perf_counter() - t

        # 2. reward and 3. advantage, per experiment
        t = time.perf_counter()
        rows: list[_Row] = []
        rewards_of: dict[str, list[float]] = {}
        by_exp: dict[str, list[tuple[dict[str, Any], str, GenerationRequest, Completion]]] = defaultdict(list)
        for req, (exp_name, row, prompt), comp in zip(requests, owners, completions, strict=True):
            by_exp[exp_name].append((row, prompt, req, comp))
        for exp in active:
            items = by_exp[exp.name]
            if not all(math.isfinite(lp) for *_, comp in items for lp in comp.logprobs):
                exp.fail(
                    f"non-finite log-probabilities in the rollout at step {exp.step + 1}: the adapter diverged"
                )
                continue
            try:
                rewards = self._score(exp, [(row, prompt, comp) for row, prompt, _, comp in items])
            except RewardError as exc:
                exp.fail(f"reward: {exc}")
                continue
            rewards_of[exp.name] = rewards
            algo = exp.spec.algorithm
            grouped = torch.tensor(rewards, dtype=torch.float32).view(algo.prompts_per_step, algo.group_size)
            advantages = group_advantages(grouped, scale_by_std=algo.scale_rewards).flatten().tolist()
            for (_, _, req, comp), adv in zip(items, advantages, strict=True):
                rows.append(_Row(exp.name, req.prompt_ids, comp, adv))
        timings.reward = time.perf_counter() - t

        # 4. loss: mixed-adapter forward/backward, micro-batched to a token budget
        t = time.perf_counter()
        losses, kls, train_tokens = self._backward(rows)
        timings.forward_backward = time.perf_counter() - t

        # 5. each adapter's own optimizer
        t = time.perf_counter()
        grad_norms: dict[str, float] = {}
        for exp in active:
            if not exp.active:
                continue
            assert exp.optimizer is not None
            try:
                if not math.isfinite(losses.get(exp.name, 0.0)):
                    raise NonFiniteError(f"loss is {losses[exp.name]}")
                grad_norms[exp.name] = exp.optimizer.step()
            except NonFiniteError as exc:
                exp.fail(f"non-finite training signal at step {exp.step + 1}: {exc}")
            exp.optimizer.zero_grad()
            if exp.active:
                self.engine.sync_adapter(exp.name)
        timings.optimizer = time.perf_counter() - t

        seconds = time.perf_counter() - started
        report = StepReport(
            [e.name for e in active],
            timings,
            sum(len(c.token_ids) for c in completions),
            train_tokens,
            seconds,
        )
        for exp in active:
            if exp.state is State.FAILED:
                self.remove(exp.name)
                continue
            exp.step += 1
            exp.wall_seconds += seconds
        stepped = [e for e in active if e.active]
        evals = self._evaluate_due(stepped, timings)
        for exp in stepped:
            if not exp.active:  # its reward failed during eval
                continue
            rewards = rewards_of[exp.name]
            tokens = [len(r.completion.token_ids) for r in rows if r.experiment == exp.name]
            metrics = {
                "step": exp.step,
                "reward_mean": sum(rewards) / len(rewards),
                "reward_std": float(torch.tensor(rewards).std(unbiased=False)),
                "loss": losses.get(exp.name, 0.0),
                "kl": kls.get(exp.name, 0.0),
                "tokens": sum(tokens),
                "completion_length": sum(tokens) / max(len(tokens), 1),
                "grad_norm": grad_norms.get(exp.name, 0.0),
                "seconds": seconds,
            }
            if exp.name in evals:
                metrics["eval_reward"] = evals[exp.name]
            exp.record(metrics)
            if exp.step >= exp.total_steps:
                self._finish(exp, timings)
                report.finished.append(exp.name)
            elif exp.step % exp.spec.checkpoint.every_steps == 0:
                self._checkpoint(exp, timings)
        report.seconds = time.perf_counter() - started
        log.info(
            "event=step experiments=%d rollout_s=%.2f reward_s=%.2f fwd_bwd_s=%.2f optim_s=%.3f eval_s=%.2f ckpt_s=%.2f tokens=%d",
            len(active), timings.rollout, timings.reward, timings.forward_backward, timings.optimizer,
            timings.evaluation, timings.checkpoint, report.rollout_tokens,
        )  # fmt: skip
        return report

    # ----------------------------------------------------------------- pieces of the step

    def _encode(self, exp: Experiment, row: dict[str, Any]) -> tuple[str, list[int]]:
        prompt = render_prompt(row, exp.spec.dataset, self.tokenizer)
        ids = self.tokenizer(prompt, add_special_tokens=not exp.spec.dataset.chat_template)["input_ids"]
        limit = exp.spec.algorithm.max_prompt_tokens
        return prompt, ids[-limit:]  # keep the end: the question usually sits last

    def _requests(self, exp: Experiment) -> list[tuple[GenerationRequest, tuple[str, dict[str, Any], str]]]:
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
                out.append((request, (exp.name, row, prompt)))
        return out

    def _score(self, exp: Experiment, items: Sequence[tuple[dict[str, Any], str, Completion]]) -> list[float]:
        assert exp.reward is not None
        samples = [
            Sample(
                prompt=prompt,
                completion=str(self.tokenizer.decode(comp.token_ids, skip_special_tokens=True)),
                row=row,
            )
            for row, prompt, comp in items
        ]
        rewards = exp.reward(samples)
        if len(rewards) != len(samples):
            raise RewardError(f"returned {len(rewards)} rewards for {len(samples)} samples")
        return [float(r) for r in rewards]

    def _backward(self, rows: list[_Row]) -> tuple[dict[str, float], dict[str, float], int]:
        """Accumulate every adapter's gradient from one pass over the mixed rows; return per-experiment loss/KL."""
        losses: dict[str, float] = defaultdict(float)
        kls: dict[str, float] = defaultdict(float)
        if not rows:
            return losses, kls, 0
        lengths = torch.tensor([len(r.completion.token_ids) for r in rows])
        mask_all = (torch.arange(int(lengths.max().item()) or 1)[None, :] < lengths[:, None]).float()
        specs = {name: self.experiments[name].spec for name in {r.experiment for r in rows}}
        weights = torch.zeros(len(rows))
        for aggregation in {s.algorithm.loss_aggregation for s in specs.values()}:
            idx = [
                i for i, r in enumerate(rows) if specs[r.experiment].algorithm.loss_aggregation == aggregation
            ]
            w = row_weights(mask_all[idx], [rows[i].experiment for i in idx], aggregation)
            weights[idx] = w
        kl_tokens: dict[str, float] = defaultdict(float)
        # Rows with zero advantage and no KL term have zero gradient: skip their forward entirely.
        useful = [
            i for i, r in enumerate(rows)
            if r.completion.token_ids and (r.advantage != 0.0 or specs[r.experiment].algorithm.kl_coef > 0)
        ]  # fmt: skip
        # By prompt, so that a group's rows share a micro-batch and with it one prompt pass.
        useful.sort(key=lambda i: (len(rows[i].prompt_ids), rows[i].prompt_ids, rows[i].experiment, i))
        train_tokens = 0
        self.model.train()
        for batch in self._micro_batches(useful, rows):
            train_tokens += self._micro_step(
                [rows[i] for i in batch], weights[batch], specs, losses, kls, kl_tokens
            )
        self.model.eval()
        for name in kls:
            kls[name] = kls[name] / max(kl_tokens[name], 1.0)
        return dict(losses), dict(kls), train_tokens

    def _micro_batches(self, order: list[int], rows: list[_Row]) -> list[list[int]]:
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i in order:
            n = len(rows[i].prompt_ids) + len(rows[i].completion.token_ids)
            if current and max(longest, n) * (len(current) + 1) > self.micro_batch_tokens:
                batches.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, n)
        if current:
            batches.append(current)
        return batches

    def _micro_step(
        self,
        rows: list[_Row],
        weights: torch.Tensor,
        specs: Mapping[str, Any],
        losses: dict[str, float],
        kls: dict[str, float],
        kl_tokens: dict[str, float],
    ) -> int:
        device = self.model.model.device
        pad = self.tokenizer.pad_token_id
        # Completions are left-aligned and right-padded to the longest: column j is token j.
        n = max(len(r.completion.token_ids) for r in rows)
        targets = torch.tensor(
            [r.completion.token_ids + [pad] * (n - len(r.completion.token_ids)) for r in rows], device=device
        )
        mask = torch.zeros(len(rows), n, device=device)
        old = torch.zeros(len(rows), n, device=device)
        for i, r in enumerate(rows):
            c = len(r.completion.token_ids)
            mask[i, :c] = 1.0
            old[i, :c] = torch.tensor(r.completion.logprobs, device=device)
        temps = torch.tensor(
            [_train_temperature(specs[r.experiment].algorithm.temperature) for r in rows], device=device
        )
        advantages = torch.tensor([r.advantage for r in rows], device=device)
        adapters = [r.experiment for r in rows]
        kl_coefs = torch.tensor([specs[r.experiment].algorithm.kl_coef for r in rows], device=device)

        logits = completion_logits(self.model, rows, adapters, pad)
        logprobs = _logprobs(logits, targets, temps)
        del logits
        ref = None
        kl_rows = [i for i, coef in enumerate(kl_coefs.tolist()) if coef > 0]
        if kl_rows:
            # The reference policy is the same model with adapters switched off, needed only on
            # rows that pay a KL term; elsewhere it equals the policy, so their k3 term is 0.
            ref = logprobs.detach().clone()
            with torch.no_grad():
                kl_batch = [rows[i] for i in kl_rows]
                ref_logits = completion_logits(self.model, kl_batch, [None] * len(kl_rows), pad)
                width = ref_logits.shape[1]
                ref[kl_rows, :width] = _logprobs(ref_logits, targets[kl_rows, :width], temps[kl_rows])
                del ref_logits
        clip_low = torch.tensor([specs[a].algorithm.clip_low for a in adapters], device=device)[:, None]
        clip_high = torch.tensor([specs[a].algorithm.clip_high for a in adapters], device=device)[:, None]
        per_token, kl = per_token_loss(
            logprobs,
            old,
            advantages,
            clip_low=clip_low,
            clip_high=clip_high,
            ref_logprobs=ref,
            kl_coef=kl_coefs[:, None],
        )
        # [B] each row's share of its experiment's loss
        per_row = (per_token * mask).sum(-1) * weights.to(device)
        per_row.sum().backward()
        for i, name in enumerate(adapters):
            losses[name] += float(per_row[i].detach())
            kls[name] += float((kl[i] * mask[i]).sum())
            kl_tokens[name] += float(mask[i].sum())
        return sum(len(r.prompt_ids) + len(r.completion.token_ids) for r in rows)

    # ----------------------------------------------------------------- eval, checkpoints, completion

    def _evaluate_due(self, experiments: list[Experiment], timings: Timings) -> dict[str, float]:
        due = [
            e for e in experiments
            if (e.spec.evaluation.every_steps and e.step % e.spec.evaluation.every_steps == 0) or e.step >= e.total_steps
        ]  # fmt: skip
        if not due:
            return {}
        t = time.perf_counter()
        results = self.evaluate(due)
        timings.evaluation += time.perf_counter() - t
        return results

    def evaluate(self, experiments: list[Experiment]) -> dict[str, float]:
        """Greedy completions on each experiment's eval rows, all in one batch; mean reward per experiment."""
        requests, owners = [], []
        for exp in experiments:
            assert exp.splits is not None
            for row in exp.splits.eval[: exp.spec.evaluation.samples]:
                prompt, ids = self._encode(exp, row)
                requests.append(
                    GenerationRequest(ids, exp.name, exp.spec.algorithm.max_new_tokens, temperature=0.0)
                )
                owners.append((exp.name, row, prompt))
        completions = self.engine.generate(requests) if requests else []
        results: dict[str, float] = {}
        for exp in experiments:
            items = [
                (row, prompt, c)
                for (name, row, prompt), c in zip(owners, completions, strict=True)
                if name == exp.name
            ]
            if not items:
                continue
            try:
                scores = self._score(exp, items)
            except RewardError as exc:
                exp.fail(f"reward (eval): {exc}")
                self.remove(exp.name)
                continue
            exp.eval_reward = results[exp.name] = sum(scores) / len(scores)
        return results

    def _checkpoint(self, exp: Experiment, timings: Timings) -> Path:
        assert exp.optimizer is not None and exp.sampler is not None
        t = time.perf_counter()
        path = save_checkpoint(
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
        )
        timings.checkpoint += time.perf_counter() - t
        return path

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


def _train_temperature(temperature: float) -> float:
    return temperature if temperature > 0 else 1.0


def completion_logits(
    model: MultiLoRAModel, rows: Sequence[_Row], adapters: Sequence[str | None], pad_id: int
) -> torch.Tensor:
    """Logits [B, C, V] predicting each row's completion tokens, running each distinct prompt once.

    Column j predicts completion token j; C is the longest completion. The rows of a GRPO group
    share prompt and adapter, so the prompt runs once into a KV cache that is then copied to each
    row; the copy is differentiable, so every row's gradient still reaches the prompt's tokens,
    and only the completions run per row. Row i uses adapter ``adapters[i]`` (None: the base).
    """
    device = model.model.device
    cache = DynamicCache(config=model.model.config)
    prompts = [(adapter, row.prompt_ids) for row, adapter in zip(rows, adapters, strict=True)]
    done = prefill_prompts(model, prompts, cache, pad_id)
    last = done.logits[:, None]  # [B, 1, V] predicts completion token 0
    c = max(len(r.completion.token_ids) for r in rows)
    if c == 1:
        return last

    # The completions, right-padded: a row's padding comes after its tokens, so they never see it.
    lengths = torch.tensor([len(r.completion.token_ids) for r in rows], device=device)
    completion_ids = torch.tensor(
        [r.completion.token_ids + [pad_id] * (c - len(r.completion.token_ids)) for r in rows], device=device
    )
    completion_mask = (torch.arange(c, device=device)[None, :] < lengths[:, None]).long()
    with model.use_adapters(adapters):
        rest = model(
            input_ids=completion_ids,
            attention_mask=torch.cat([done.attention_mask, completion_mask], dim=1),
            position_ids=done.position_ids[:, -1:] + 1 + torch.arange(c, device=device)[None, :],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=torch.arange(c - 1, device=device),  # token c-1 predicts nothing we train on
        ).logits  # [B, c-1, V]
    return torch.cat([last, rest], dim=1)


def _logprobs(logits: torch.Tensor, targets: torch.Tensor, temps: torch.Tensor) -> torch.Tensor:
    """token_logprobs with a per-row temperature (rows of different experiments may differ)."""
    if bool((temps == temps[0]).all()):
        return token_logprobs(logits, targets, float(temps[0]))
    # Scaling first keeps one call: per-row calls on logits[i : i + 1] each backpropagate a
    # zero-filled gradient the size of the whole [B, T, V] logits.
    return token_logprobs(logits / temps[:, None, None], targets, 1.0)
