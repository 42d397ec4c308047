"""The quickstart's adapter shapes, shared by the trainer benchmarks so they measure the same model."""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import loraplex_trainer  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.multilora import AdapterConfig

# The quickstart's four adapters: (rank, target modules).
ADAPTERS: list[tuple[int, tuple[str, ...] | str]] = [
    (8, ("q_proj", "v_proj", "o_proj")),
    (4, ("q_proj", "v_proj")),
    (16, "all-linear"),
    (8, ("q_proj", "k_proj", "v_proj", "o_proj")),
]


def add_quickstart_adapters(model: MultiLoRAModel, count: int, *, first: int = 0) -> list[str]:
    """Add adapters ``first`` .. ``count - 1`` cycling through the quickstart's shapes; return their names."""
    names = []
    for index in range(first, count):
        rank, targets = ADAPTERS[index % len(ADAPTERS)]
        name = f"adapter{index}"
        model.add_adapter(
            name, AdapterConfig(rank=rank, alpha=2.0 * rank, target_modules=targets), seed=index
        )
        names.append(name)
    return names
