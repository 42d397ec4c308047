"""Mixed into vLLM's worker (``worker_extension_cls``): the log-probs the trainer needs from vLLM.

vLLM's ``processed_logprobs`` are those of the distribution a token was drawn from: after the
temperature and after top-p renormalisation. :class:`~loraplex_trainer.rollout.base.Completion`
defines the sampled token's log-prob before top-p (what the trainer recomputes), so the sampler's
top-k/top-p step is wrapped to report log softmax of the temperature-scaled logits it receives,
and still samples exactly as before. Imported by vLLM inside its worker, so it imports nothing
heavy at module level.
"""

from __future__ import annotations

from typing import Any


class LoraplexWorkerExtension:
    """Methods vLLM adds to its worker; the engine calls them through ``collective_rpc``."""

    model_runner: Any  # the worker's, set by vLLM

    def loraplex_report_logprobs_before_top_p(self) -> str:
        """Wrap the sampler's top-k/top-p step once; returns what was wrapped, for the log."""
        import torch

        sampler = self.model_runner.sampler.topk_topp_sampler
        if getattr(sampler, "loraplex_wrapped", False):
            return type(sampler).__name__
        sample = sampler.forward

        def forward(logits: torch.Tensor, generators: Any, k: Any, p: Any) -> tuple[torch.Tensor, Any]:
            # Before sampling: the sampler may mask the logits in place.
            scaled = logits.log_softmax(dim=-1, dtype=torch.float32)
            sampled, _ = sample(logits, generators, k, p)
            return sampled, scaled

        sampler.forward = forward
        sampler.loraplex_wrapped = True
        return type(sampler).__name__
