"""The multi-LoRA linear layer: one frozen base product per batch, each adapter's update on its own rows.

Like PEFT's ``tuners/lora/layer.py``, this module holds only the arithmetic. Injecting layers into
a model, the adapter registry and PEFT-format files live in ``adapters.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

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


LoRAPath = Literal["auto", "loop", "batched"]
"""How a layer applies the adapters of a batch: ``loop`` runs each adapter on its own rows (two
small matmuls and a gather/scatter per adapter per layer), ``batched`` stacks them and runs two
batched matmuls whatever their number (the kernel count per layer is constant, which is what a
GPU needs with many small adapters), ``auto`` is batched on CUDA and the loop elsewhere."""


@dataclass(frozen=True)
class AdapterRouting:
    """Which rows of a batch belong to which adapter; built once per batch, shared by every layer."""

    batch_size: int
    rows: dict[str, torch.Tensor]  # adapter name -> 1-D int64 row indices on the model's device
    batched: bool = False
    """Use the batched path (see LoRAPath) in every layer for this batch."""
    row_map: torch.Tensor | None = None
    """[adapters in ``rows`` order, most rows of one adapter]: each adapter's rows, padded with
    ``batch_size`` (a row of zeros the batched path appends); only with ``batched``."""
    _row_maps: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def row_map_of(self, names: tuple[str, ...]) -> torch.Tensor:
        """``row_map``'s rows of these adapters (those a layer holds), made once per batch, not per layer."""
        assert self.row_map is not None
        if len(names) == len(self.rows):
            return self.row_map
        found = self._row_maps.get(names)
        if found is None:
            order = {name: i for i, name in enumerate(self.rows)}
            index = torch.tensor([order[name] for name in names], device=self.row_map.device)
            found = self._row_maps[names] = self.row_map.index_select(0, index)
        return found

    @classmethod
    def from_rows(
        cls, rows: Sequence[str | None], device: torch.device | str, *, batched: bool = False
    ) -> AdapterRouting:
        """Group row positions by adapter name; rows marked None use the base model only."""
        grouped: dict[str, list[int]] = {}
        for index, name in enumerate(rows):
            if name is not None:
                grouped.setdefault(name, []).append(index)
        row_map = None
        if batched and grouped:
            widest = max(len(indices) for indices in grouped.values())
            padded = [indices + [len(rows)] * (widest - len(indices)) for indices in grouped.values()]
            row_map = torch.tensor(padded, dtype=torch.long, device=device)
        return cls(
            batch_size=len(rows),
            rows={
                name: torch.tensor(indices, dtype=torch.long, device=device)
                for name, indices in grouped.items()
            },
            batched=batched,
            row_map=row_map,
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
        self._plans: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

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
        self._plans.clear()

    def remove_adapter(self, name: str) -> None:
        """Drop every reference this layer holds to an adapter's parameters."""
        del self.lora_A[name]
        del self.lora_B[name]
        del self.lora_dropout[name]
        del self.scaling[name]
        self._plans.clear()

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
        if self.routing.batched and not self._dropping_out():
            return self._batched_update(x, result, self.routing)
        for name, rows in self.routing.rows.items():
            if name not in self.lora_A:
                continue  # this adapter does not target this module
            lora_A, lora_B = cast(nn.Linear, self.lora_A[name]), cast(nn.Linear, self.lora_B[name])
            x_rows = self.lora_dropout[name](x.index_select(0, rows).to(lora_A.weight.dtype))
            update = lora_B(lora_A(x_rows)) * self.scaling[name]
            # In place on a fresh tensor; autograd routes each row's gradient back to its adapter only.
            result.index_add_(0, rows, update.to(result.dtype))
        return result

    def _dropping_out(self) -> bool:
        """Whether some adapter's dropout is active: each adapter drops its own input, so loop then."""
        return self.training and any(isinstance(d, nn.Dropout) for d in self.lora_dropout.values())

    def _batched_update(self, x: torch.Tensor, result: torch.Tensor, routing: AdapterRouting) -> torch.Tensor:
        """``result`` plus every row's adapter update, in a number of kernels that does not grow with adapters.

        Adapters are stacked, padded with zeros to the largest rank, and their rows gathered into one
        padded block each (``routing.row_map``); two batched matmuls then apply every adapter to its
        own rows at once, and one scatter adds the updates back. Equal to the loop up to rounding.
        """
        names = tuple(name for name in routing.rows if name in self.lora_A)
        if not names:
            return result
        pad_index, scale = self._stack_plan(names)
        row_map = routing.row_map_of(names)
        n, widest = row_map.shape
        r_max = pad_index.numel() // n
        a_cat = torch.cat([*(self._a(m).weight for m in names), self._zero_rows(1, x.shape[-1])])
        b_cat = torch.cat([*(self._b(m).weight for m in names), self._zero_rows(result.shape[-1], 1)], 1)
        a_stack = a_cat.index_select(0, pad_index).view(n, r_max, -1)  # [n, r, in]
        b_stack = b_cat.index_select(1, pad_index).view(-1, n, r_max).permute(1, 2, 0)  # [n, r, out]
        batch = x.shape[0]
        x3 = x.reshape(batch, -1, x.shape[-1]).to(torch.float32)
        length = x3.shape[1]
        x_pad = torch.cat([x3, x3.new_zeros(1, length, x3.shape[-1])])
        gathered = x_pad.index_select(0, row_map.flatten()).view(n, widest * length, -1)
        hidden = torch.bmm(gathered, a_stack.transpose(1, 2)) * scale.view(n, 1, 1)
        update = torch.bmm(hidden, b_stack).view(n * widest, length, -1)
        out3 = result.reshape(batch, length, -1)
        out_pad = torch.cat([out3, out3.new_zeros(1, length, out3.shape[-1])])
        out_pad.index_add_(0, row_map.flatten(), update.to(out_pad.dtype))
        return out_pad[:batch].view(result.shape)

    def _stack_plan(self, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """For these adapters: where each stacked rank row comes from (the zero row past the end
        for padding), and their scalings; kept until the adapters change."""
        plan = self._plans.get(names)
        if plan is None:
            ranks = [self._a(m).out_features for m in names]
            total, r_max, offset = sum(ranks), max(ranks), 0
            index: list[int] = []
            for rank in ranks:
                index += [offset + j if j < rank else total for j in range(r_max)]
                offset += rank
            device = self.base_layer.weight.device
            # Kept across batches: a plan first made while generating must still serve training.
            with torch.inference_mode(False):
                plan = (
                    torch.tensor(index, dtype=torch.long, device=device),
                    torch.tensor([self.scaling[m] for m in names], dtype=torch.float32, device=device),
                )
            self._plans[names] = plan
        return plan

    def _a(self, name: str) -> nn.Linear:
        return cast(nn.Linear, self.lora_A[name])

    def _b(self, name: str) -> nn.Linear:
        return cast(nn.Linear, self.lora_B[name])

    def _zero_rows(self, rows: int, columns: int) -> torch.Tensor:
        return torch.zeros(rows, columns, dtype=torch.float32, device=self.base_layer.weight.device)

    def extra_repr(self) -> str:
        """Show the adapters' ranks in print(model)."""
        ranks = {name: module.out_features for name, module in self.lora_A.items()}
        return f"adapters={ranks}"
