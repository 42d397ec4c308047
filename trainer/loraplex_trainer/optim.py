"""One optimizer per adapter, so no experiment's step touches another's weights or state.

A single AdamW over every adapter would be wrong even for adapters with zero gradient:
decoupled weight decay shrinks every parameter it holds, and the global grad-norm clip would
let one experiment's large gradients shrink another's update.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class NonFiniteError(RuntimeError):
    """An adapter's gradients hold NaN or inf; its step was skipped."""


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyperparameters of one experiment (spec.optimizer)."""

    learning_rate: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0


class AdapterOptimizer:
    """AdamW with grad-norm clipping over exactly one adapter's parameters."""

    def __init__(self, params: list[nn.Parameter], config: OptimizerConfig) -> None:
        if not params:
            raise ValueError("AdapterOptimizer needs at least one parameter")
        self.params = params
        self.config = config
        self._optimizer = torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
        )

    def step(self) -> float:
        """Clip this adapter's gradients to its own max norm, take an AdamW step, return the pre-clip norm.

        Raises NonFiniteError, without stepping, when the norm is NaN or inf.
        """
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        value = float(norm)
        if not math.isfinite(value):
            raise NonFiniteError(f"adapter gradient norm is {value}; optimizer step skipped")
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.config.max_grad_norm, norm)
        self._optimizer.step()
        return value

    def zero_grad(self) -> None:
        """Drop this adapter's gradients (set to None, which frees their memory)."""
        self._optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot of the AdamW moments and step counts, for checkpoints.

        A copy, not torch's references to the live moments: a checkpoint written while
        training goes on must not change under the writer (adapter state is small).
        """
        return copy.deepcopy(self._optimizer.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned, e.g. when an experiment resumes from a checkpoint."""
        # torch keeps tensors that already have the right dtype and device by reference;
        # copying keeps the caller's dict from aliasing this optimizer's moments.
        self._optimizer.load_state_dict(copy.deepcopy(state))
