"""Checkpoints of one experiment: a PEFT adapter folder plus optimizer, sampler, RNG state and step.

Layout (one folder per checkpoint, written atomically, the newest ``keepLast`` kept):

    checkpoints/step-00000010/
        adapter_config.json          PEFT format: PeftModel.from_pretrained loads it unchanged
        adapter_model.safetensors
        optimizer.pt                 AdamW moments of this adapter only
        trainer_state.json           step, sampler state, RNG state, metric history
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .adapters import MultiLoRAModel
from .optim import AdapterOptimizer

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass(frozen=True)
class CheckpointState:
    """Everything besides tensors that a resumed experiment needs to continue exactly."""

    step: int
    sampler: dict[str, Any]
    extra: dict[str, Any]


def checkpoint_dir(root: Path, step: int) -> Path:
    """The folder of the checkpoint taken after ``step`` optimizer steps."""
    return root / f"step-{step:08d}"


def step_of(path: Path) -> int | None:
    """The step a checkpoint folder was taken after (``step-00000010`` -> 10); None for other names."""
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root``, oldest first (half-written temp folders are ignored)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = step_of(child)
        if step is not None and (child / STATE_FILE).is_file():
            found.append((step, child))
    return sorted(found)


def saved_extra(path: Path) -> dict[str, Any]:
    """What the trainer saved beside the tensors of a checkpoint (eval reward, wall seconds).

    Empty when the state file cannot be read: callers use it for reports, not to resume.
    """
    try:
        extra = json.loads((path / STATE_FILE).read_text()).get("extra")
    except (OSError, ValueError, AttributeError):
        return {}
    return extra if isinstance(extra, dict) else {}


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def save_checkpoint(
    root: Path,
    *,
    model: MultiLoRAModel,
    adapter: str,
    optimizer: AdapterOptimizer,
    state: CheckpointState,
    base_model_name_or_path: str,
    keep_last: int,
) -> Path:
    """Write a checkpoint atomically (temp folder, then rename) and prune all but the newest ``keep_last``."""
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, state.step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        model.save_adapter(adapter, tmp, base_model_name_or_path=base_model_name_or_path)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        payload = {"step": state.step, "sampler": state.sampler, "extra": state.extra}
        (tmp / STATE_FILE).write_text(json.dumps(payload))
        if final.exists():  # the same step written again after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("event=checkpoint adapter=%s step=%d path=%s", adapter, state.step, final)
    return final


def load_checkpoint(
    path: Path, *, model: MultiLoRAModel, adapter: str, optimizer: AdapterOptimizer
) -> CheckpointState:
    """Load adapter weights and optimizer state from ``path`` into an adapter that already exists."""
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    model.load_adapter_state_dict(adapter, weights)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=False))
    payload = json.loads((path / STATE_FILE).read_text())
    log.info("event=resume adapter=%s step=%d path=%s", adapter, payload["step"], path)
    return CheckpointState(step=payload["step"], sampler=payload["sampler"], extra=payload.get("extra", {}))
