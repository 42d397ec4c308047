"""Checkpoints of one experiment: a PEFT adapter folder plus optimizer, sampler state and step.

Layout (one folder per checkpoint, the newest ``keepLast`` kept):

    checkpoints/step-00000010/
        adapter_config.json          PEFT format: PeftModel.from_pretrained loads it unchanged
        adapter_model.safetensors
        optimizer.safetensors        AdamW moments of this adapter only (tensors; groups as JSON metadata)
        trainer_state.json           step, sampler state, extras (eval reward, wall seconds)
        manifest.json                written last: every other file with its size and SHA-256

Nothing here is executable: tensors are safetensors, everything else JSON, so a file someone
else wrote into the folder can at worst be refused, never run. A checkpoint is complete only
when its manifest verifies. It is written in a temporary folder, renamed into place, and an
older folder of the same step is replaced only after the new one is complete.
"""

from __future__ import annotations

import hashlib
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
from safetensors import SafetensorError
from safetensors.torch import load_file

from .adapters import WEIGHTS_NAME, MultiLoRAModel, save_tensors
from .optim import AdapterOptimizer

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "adapter_config.json"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_NAME, OPTIMIZER_FILE, STATE_FILE)
FORMAT = 2
"""Version of this layout; 1 was a pickled optimizer.pt, which is no longer read."""
DAMAGED_SUFFIX = ".damaged"
REPLACED_SUFFIX = ".replaced"


class CheckpointError(ValueError):
    """A checkpoint folder is damaged or unreadable; the message names the folder and what is wrong."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint that does not fit the adapter (its spec changed, e.g. lora.rank)."""


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
    """Checkpoint folders under ``root`` that carry a manifest, oldest first (not yet verified)."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        step = step_of(child)
        if step is not None and (child / MANIFEST_FILE).is_file():
            found.append((step, child))
    return sorted(found)


def has_checkpoint(root: Path, step: int) -> bool:
    """Whether a completed checkpoint of ``step`` exists (its manifest is there; not verified)."""
    return (checkpoint_dir(root, step) / MANIFEST_FILE).is_file()


def saved_extra(path: Path) -> dict[str, Any]:
    """What the trainer saved beside the tensors of a checkpoint (eval reward, wall seconds).

    Empty when the state file cannot be read: callers use it for reports, not to resume.
    """
    try:
        extra = json.loads((path / STATE_FILE).read_text()).get("extra")
    except (OSError, ValueError, AttributeError):
        return {}
    return extra if isinstance(extra, dict) else {}


# ----------------------------------------------------------------- writing


def save_checkpoint(
    root: Path,
    *,
    model: MultiLoRAModel,
    adapter: str,
    optimizer: AdapterOptimizer,
    state: CheckpointState,
    base_model_name_or_path: str,
    keep_last: int,
    keep: frozenset[str] = frozenset(),
) -> Path:
    """Write a complete checkpoint, then prune all but the newest ``keep_last`` and those named in ``keep``.

    ``keep`` holds folder names (``step-00000010``) that something points to (a candidate, promoted
    or previous revision); pruning never deletes them.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, state.step)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        model.save_adapter(adapter, tmp, base_model_name_or_path=base_model_name_or_path)
        _save_optimizer(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        payload = {"format": FORMAT, "step": state.step, "sampler": state.sampler, "extra": state.extra}
        (tmp / STATE_FILE).write_text(json.dumps(payload))
        _write_manifest(tmp)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    complete = list_checkpoints(root)
    for _, old in complete[:-keep_last]:
        if old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    log.info("event=checkpoint adapter=%s step=%d path=%s", adapter, state.step, final)
    return final


def _install(tmp: Path, final: Path) -> None:
    """Move a complete folder into place; an existing one of the same name goes only afterwards."""
    if not final.exists():
        os.replace(tmp, final)
        return
    # The same step written again (a rerun after a resume): keep the old one until the new is in
    # place. A crash in between leaves the old one at .<name>.replaced, which the next start restores.
    old = final.with_name(f".{final.name}{REPLACED_SUFFIX}")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _save_optimizer(state: dict[str, Any], path: Path) -> None:
    """AdamW's state dict as safetensors: per-parameter tensors, the rest as JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    save_tensors(tensors, path, metadata=metadata)


def _write_manifest(folder: Path) -> None:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE
    }
    (folder / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------- reading


def verify(path: Path) -> str | None:
    """Why a checkpoint folder is not complete and intact, or None when its manifest verifies."""
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            return f"{MANIFEST_FILE} is not format {FORMAT}"
    except FileNotFoundError:
        return f"no {MANIFEST_FILE} (the checkpoint was never completed)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST_FILE} is unreadable ({exc.__class__.__name__})"
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        return f"{MANIFEST_FILE} does not list {', '.join(missing)}"
    for name, entry in files.items():
        file = path / name
        if Path(name).name != name:
            return f"{MANIFEST_FILE} names {name!r}, which is not a file in the folder"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != entry.get("size"):
            return f"{name} has {file.stat().st_size} bytes, the manifest says {entry.get('size')}"
        if _sha256(file) != entry.get("sha256"):
            return f"{name} does not match its checksum"
    return None


def set_aside(path: Path, reason: str) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never deleted); its new path."""
    target = path.with_name(path.name + DAMAGED_SUFFIX)
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}.{n}")
        n += 1
    os.replace(path, target)
    log.warning("event=checkpoint_damaged path=%s moved_to=%s reason=%r", path, target.name, reason)
    return target


def remove_temporaries(root: Path) -> list[str]:
    """Clear what a killed trainer left mid-write; the names of the temporary folders removed.

    A checkpoint that was being replaced (``.step-N.replaced``) goes back into place when the
    new one never arrived; every other ``.step-*`` folder is a half-written one and is deleted.
    """
    if not root.is_dir():
        return []
    for child in root.iterdir():
        if child.name.startswith(".step-") and child.name.endswith(REPLACED_SUFFIX):
            final = root / child.name[1 : -len(REPLACED_SUFFIX)]
            if not final.exists():
                os.replace(child, final)
                log.warning("event=checkpoint_restored path=%s", final)
    removed = []
    for child in root.iterdir():
        if child.name.startswith(".step-") and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child.name)
    if removed:
        log.info("event=checkpoint_temporaries_removed root=%s folders=%s", root, ",".join(sorted(removed)))
    return removed


def load_checkpoint(
    path: Path, *, model: MultiLoRAModel, adapter: str, optimizer: AdapterOptimizer, verified: bool = False
) -> CheckpointState:
    """Load a checkpoint into an adapter that already exists; CheckpointError when it does not fit.

    The manifest is checked first unless the caller just did (``verified``, as ``resume_point``
    does). Nothing is changed unless everything loads: weights and optimizer state are read and
    checked first, then copied.
    """
    problem = None if verified else verify(path)
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}")
    try:
        weights = load_file(str(path / WEIGHTS_NAME))
        optimizer_state = _load_optimizer(path / OPTIMIZER_FILE)
        payload = json.loads((path / STATE_FILE).read_text())
        state = CheckpointState(
            step=int(payload["step"]), sampler=dict(payload["sampler"]), extra=payload.get("extra") or {}
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc}") from None
    if step_of(path) != state.step:
        raise CheckpointError(f"{path}: {STATE_FILE} says step {state.step}")
    try:
        _check_fits(optimizer_state, optimizer)
        model.load_adapter_state_dict(adapter, weights)
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointMismatch(f"{path}: does not fit adapter {adapter!r}: {exc}") from None
    log.info("event=resume adapter=%s step=%d path=%s", adapter, state.step, path)
    return state


def _load_optimizer(path: Path) -> dict[str, Any]:
    """The state dict _save_optimizer wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    groups = json.loads(metadata["param_groups"])
    for group in groups:  # JSON has no tuples; torch's own state dict holds betas as one
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    scalars = json.loads(metadata.get("scalars", "{}"))
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in scalars.items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": groups}


def _check_fits(state: dict[str, Any], optimizer: AdapterOptimizer) -> None:
    """Raise ValueError unless the saved moments have the shapes of this adapter's parameters."""
    params = optimizer.params
    groups = state["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(params):
        raise ValueError(
            f"the optimizer state holds {sum(len(g['params']) for g in groups)} parameters, not {len(params)}"
        )
    for index, values in state["state"].items():
        if not 0 <= index < len(params):
            raise ValueError(f"the optimizer state names parameter {index} of {len(params)}")
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[index].shape:
                raise ValueError(
                    f"{key} of parameter {index} has shape {tuple(value.shape)}, not {tuple(params[index].shape)}"
                )


def resume_point(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root``, after clearing what a crash left behind.

    Temporary folders are removed; a newer checkpoint that does not verify is set aside with a
    warning. None when there was never a checkpoint; CheckpointError naming the folder when there
    were some and none verifies.
    """
    remove_temporaries(root)
    if not root.is_dir():
        return None
    candidates = sorted(
        (step, child) for child in root.iterdir() if (step := step_of(child)) is not None and child.is_dir()
    )
    for _, path in reversed(candidates):
        problem = verify(path)
        if problem is None:
            return path
        set_aside(path, problem)
    if candidates:
        raise CheckpointError(
            f"{root}: no complete checkpoint ({len(candidates)} damaged, set aside as *{DAMAGED_SUFFIX})"
        )
    return None
