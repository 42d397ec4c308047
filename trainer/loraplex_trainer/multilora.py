"""The multi-LoRA linear layer: one frozen base product per batch, each adapter's update on its own rows.

Like PEFT's ``tuners/lora/layer.py``, this module holds only the arithmetic. Injecting layers into
a model, the adapter registry and PEFT-format files live in ``adapters.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn.utils import skip_init

from loraplex_api.experiment import ALL_LINEAR


@dataclass(frozen=True)
class AdapterConfig:
    """The hyperparameters of one LoRA adapter, as in PEFT's LoraConfig (r, lora_alpha, ...)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ALL_LINEAR  # suffixes like ("q_proj", "v_proj") or "all-linear"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")
        # Normalise to a sorted tuple so configs that target the same modules compare equal
        # (and stay hashable), whether given as a list, in another order, or as one suffix.
        if self.target_modules != ALL_LINEAR:
            targets = (self.target_modules,) if isinstance(self.target_modules, str) else self.target_modules
            if not targets:
                raise ValueError(f"lora target_modules must name at least one module or be {ALL_LINEAR!r}")
            object.__setattr__(self, "target_modules", tuple(sorted(set(targets))))

    @property
    def scaling(self) -> float:
        """The factor applied to B @ A, as in PEFT without rsLoRA."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class AdapterRouting:
    """Which rows of a batch belong to which adapter; built once per batch, shared by every layer."""

    batch_size: int
    rows: dict[str, torch.Tensor]  # adapter name -> 1-D int64 row indices on the model's device

    @classmethod
    def from_rows(cls, rows: Sequence[str | None], device: torch.device | str) -> AdapterRouting:
        """Group row positions by adapter name; rows marked None use the base model only."""
        grouped: dict[str, list[int]] = {}
        for index, name in enumerate(rows):
            if name is not None:
                grouped.setdefault(name, []).append(index)
        return cls(
            batch_size=len(rows),
            rows={
                name: torch.tensor(indices, dtype=torch.long, device=device)
                for name, indices in grouped.items()
            },
        )


class MultiLoRALinear(nn.Module):
    """A frozen nn.Linear plus any number of LoRA adapters, each applied only to the rows it owns.

    Adapter weights are fp32 whatever the base dtype, so optimizer updates are not lost to rounding.
    """

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        # Set by MultiLoRAModel.use_adapters; None means no adapter applies to any row.
        self.routing: AdapterRouting | None = None

    def add_adapter(
        self,
        name: str,
        config: AdapterConfig,
        *,
        generator: torch.Generator | None = None,
        zero: bool = False,
    ) -> None:
        """Create an adapter's A and B with PEFT's initialisation (A kaiming-uniform, B zero)."""
        # skip_init: the weights are set just below, and default init would consume the global RNG.
        factory = {"bias": False, "device": self.base_layer.weight.device, "dtype": torch.float32}
        lora_A = skip_init(nn.Linear, self.base_layer.in_features, config.rank, **factory)
        lora_B = skip_init(nn.Linear, config.rank, self.base_layer.out_features, **factory)
        with torch.no_grad():
            if zero:
                lora_A.weight.zero_()
            else:
                # Drawn on the CPU so one seed gives the same A on every device.
                weight = torch.empty(lora_A.weight.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
                lora_A.weight.copy_(weight)
            lora_B.weight.zero_()
        self.lora_A[name] = lora_A
        self.lora_B[name] = lora_B
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling

    def remove_adapter(self, name: str) -> None:
        """Drop every reference this layer holds to an adapter's parameters."""
        del self.lora_A[name]
        del self.lora_B[name]
        del self.lora_dropout[name]
        del self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base product for the whole batch, then each adapter's low-rank update on its own rows."""
        result = self.base_layer(x)
        if self.routing is None:
            return result
        if x.shape[0] != self.routing.batch_size:
            raise RuntimeError(
                f"batch has {x.shape[0]} rows but use_adapters was given {self.routing.batch_size}; "
                "pass one adapter name (or None) per row of the batch"
            )
        for name, rows in self.routing.rows.items():
            if name not in self.lora_A:
                continue  # this adapter does not target this module
            lora_A, lora_B = cast(nn.Linear, self.lora_A[name]), cast(nn.Linear, self.lora_B[name])
            x_rows = self.lora_dropout[name](x.index_select(0, rows).to(lora_A.weight.dtype))
            update = lora_B(lora_A(x_rows)) * self.scaling[name]
            # In place on a fresh tensor; autograd routes each row's gradient back to its adapter only.
            result.index_add_(0, rows, update.to(result.dtype))
        return result

    def extra_repr(self) -> str:
        """Show the adapters' ranks in print(model)."""
        ranks = {name: module.out_features for name, module in self.lora_A.items()}
        return f"adapters={ranks}"
