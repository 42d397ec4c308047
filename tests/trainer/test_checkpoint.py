"""Checkpoints on the tiny model: exact round trip, nothing executable, damage falls back to the last good one."""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex_trainer.checkpoint import (
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointState,
    _write_manifest,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    remove_temporaries,
    resume_point,
    save_checkpoint,
    verify,
)
from loraplex_trainer.experiment import Experiment, State
from loraplex_trainer.loop import Trainer
from loraplex_trainer.model_host import BaseModel
from loraplex_trainer.optim import AdapterOptimizer

from .test_loop import VOWELS, run, spec

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "vowels.py").write_text(VOWELS)
    return tmp_path


@pytest.fixture
def trained(tiny_base: BaseModel, workdir: Path) -> tuple[Trainer, Experiment]:
    """One experiment trained 4 steps with a checkpoint every 2 (step-2 and step-4 kept)."""
    trainer = Trainer(tiny_base)
    exp = Experiment("a", spec(**{"checkpoint.keepLast": 3}), workdir / "out" / "a")
    run(trainer, exp, base_dir=workdir)
    assert exp.state is State.COMPLETED
    assert [s for s, _ in list_checkpoints(exp.checkpoint_root)] == [2, 4]
    return trainer, exp


def resumed(tiny_model_dir: Path, workdir: Path, **overrides: object) -> Experiment:
    """The same experiment added to a fresh trainer with more steps to go: where does it resume?"""
    from loraplex_trainer.model_host import load_base_model

    trainer = Trainer(load_base_model(f"file://{tiny_model_dir}"))
    exp = Experiment("a", spec(**{"algorithm.maxSteps": 6, **overrides}), workdir / "out" / "a")
    trainer.add(exp, base_dir=workdir)
    trainer.remove("a")
    return exp


def readd_adapter(trainer: Trainer, exp: Experiment) -> AdapterOptimizer:
    """Add the finished experiment's adapter back by hand, with a fresh optimizer for it."""
    trainer.model.add_adapter(exp.name, exp.adapter_config, seed=1)
    return AdapterOptimizer(trainer.model.adapter_parameters(exp.name), exp.optimizer_config)


def test_round_trip_is_exact_and_holds_no_pickle(
    trained: tuple[Trainer, Experiment],
    tiny_model_dir: Path,
    workdir: Path,
) -> None:
    _, exp = trained
    path = checkpoint_dir(exp.checkpoint_root, 4)
    assert verify(path) is None
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["adapter_config.json", WEIGHTS, OPTIMIZER_FILE, STATE_FILE, MANIFEST_FILE]
    )
    moments = load_file(str(path / OPTIMIZER_FILE))  # a plain tensor file
    assert any(k.endswith("exp_avg_sq") for k in moments) and all(
        t.dtype == torch.float32 for t in moments.values()
    )
    again = resumed(tiny_model_dir, workdir)
    assert again.step == 4 and again.state is State.RUNNING


def test_a_pickle_in_place_of_the_optimizer_state_is_refused_and_never_run(
    trained: tuple[Trainer, Experiment],
    tiny_model_dir: Path,
    workdir: Path,
    tmp_path: Path,
) -> None:
    _, exp = trained
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
            return (os.system, (f"touch {marker}",))

    path = checkpoint_dir(exp.checkpoint_root, 4)
    (path / OPTIMIZER_FILE).write_bytes(pickle.dumps({"state": Payload()}))
    (path / "optimizer.pt").write_bytes(pickle.dumps(Payload()))  # the old file name: never read
    _write_manifest(path)  # an attacker who can write the folder can also rewrite the manifest
    assert verify(path) is None

    again = resumed(tiny_model_dir, workdir)
    assert not marker.exists()
    assert again.step == 2 and again.state is State.RUNNING  # fell back to the previous checkpoint
    assert (exp.checkpoint_root / "step-00000004.damaged").is_dir()  # set aside, not deleted


def _missing_weights(path: Path) -> None:
    (path / WEIGHTS).unlink()


def _truncated_weights(path: Path) -> None:
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])


def _missing_optimizer(path: Path) -> None:
    (path / OPTIMIZER_FILE).unlink()


def _empty_state(path: Path) -> None:
    (path / STATE_FILE).write_text("")


def _no_manifest(path: Path) -> None:
    (path / MANIFEST_FILE).unlink()


def _garbled_manifest(path: Path) -> None:
    (path / MANIFEST_FILE).write_text('{"format": 2, "files": ')


@pytest.mark.parametrize(
    "damage",
    [_missing_weights, _truncated_weights, _missing_optimizer, _empty_state, _no_manifest, _garbled_manifest],
)
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_used(
    damage: Callable[[Path], None],
    trained: tuple[Trainer, Experiment],
    tiny_model_dir: Path,
    workdir: Path,
) -> None:
    _, exp = trained
    damage(checkpoint_dir(exp.checkpoint_root, 4))
    metrics = exp.out_dir / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "rew')  # a line the crash cut short

    again = resumed(tiny_model_dir, workdir)
    assert again.step == 2 and again.state is State.RUNNING, again.message
    assert (exp.checkpoint_root / "step-00000004.damaged").is_dir()
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_when_no_checkpoint_verifies_only_that_experiment_fails_naming_the_folder(
    trained: tuple[Trainer, Experiment],
    tiny_model_dir: Path,
    workdir: Path,
) -> None:
    _, exp = trained
    for step in (2, 4):
        _empty_state(checkpoint_dir(exp.checkpoint_root, step))
    again = resumed(tiny_model_dir, workdir)
    assert again.state is State.FAILED
    assert str(exp.checkpoint_root) in again.message and "no complete checkpoint" in again.message
    assert resume_point(exp.checkpoint_root) is None  # both set aside; a new run may start over


def test_a_checkpoint_that_does_not_fit_a_changed_rank_fails_the_experiment_and_is_kept(
    trained: tuple[Trainer, Experiment],
    tiny_model_dir: Path,
    workdir: Path,
) -> None:
    _, exp = trained
    again = resumed(tiny_model_dir, workdir, **{"lora.rank": 8})
    assert again.state is State.FAILED and "does not fit adapter 'a'" in again.message
    assert [s for s, _ in list_checkpoints(exp.checkpoint_root)] == [2, 4]  # intact, not set aside


def test_leftovers_of_a_killed_write_are_cleared_and_a_half_replaced_step_is_restored(
    trained: tuple[Trainer, Experiment],
) -> None:
    _, exp = trained
    root = exp.checkpoint_root
    (root / ".step-00000006.abc123").mkdir()  # killed while writing step 6
    (root / ".step-00000006.abc123" / WEIGHTS).write_bytes(b"half")
    os.replace(root / "step-00000004", root / ".step-00000004.replaced")  # killed while replacing step 4
    assert remove_temporaries(root) == [".step-00000006.abc123"]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000004"]
    assert verify(root / "step-00000004") is None


def test_rewriting_a_step_keeps_the_old_folder_until_the_new_one_is_in_place(
    trained: tuple[Trainer, Experiment], monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer, exp = trained
    # Write step 4 again, as a rerun after resuming from step 4 would, and fail the final rename.
    optimizer = readd_adapter(trainer, exp)
    before = (checkpoint_dir(exp.checkpoint_root, 4) / WEIGHTS).read_bytes()
    real_replace = os.replace

    def failing(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(src).name.startswith(".step-00000004.") and not Path(src).name.endswith(".replaced"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr("loraplex_trainer.checkpoint.os.replace", failing)
    state = CheckpointState(step=4, sampler={"seed": 1, "epoch": 0, "position": 0}, extra={})
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(
            exp.checkpoint_root,
            model=trainer.model,
            adapter="a",
            optimizer=optimizer,
            state=state,
            base_model_name_or_path="tiny",
            keep_last=2,
        )
    assert (checkpoint_dir(exp.checkpoint_root, 4) / WEIGHTS).read_bytes() == before
    assert verify(checkpoint_dir(exp.checkpoint_root, 4)) is None
    assert not [p for p in exp.checkpoint_root.iterdir() if p.name.startswith(".")]


def test_pruning_keeps_the_revisions_status_points_to(tiny_base: BaseModel, workdir: Path) -> None:
    trainer = Trainer(tiny_base)
    exp = Experiment(
        "a",
        spec(**{"algorithm.maxSteps": 8, "checkpoint.everySteps": 1, "checkpoint.keepLast": 2}),
        workdir / "out" / "a",
        pinned_revisions=frozenset({"step-00000002", "step-00000005"}),
    )
    run(trainer, exp, base_dir=workdir)
    assert [s for s, _ in list_checkpoints(exp.checkpoint_root)] == [2, 5, 7, 8]


def test_load_checkpoint_refuses_an_unverified_folder(trained: tuple[Trainer, Experiment]) -> None:
    trainer, exp = trained
    path = checkpoint_dir(exp.checkpoint_root, 2)
    _truncated_weights(path)
    optimizer = readd_adapter(trainer, exp)
    with pytest.raises(CheckpointError, match=f"{path}: {WEIGHTS} has"):
        load_checkpoint(path, model=trainer.model, adapter="a", optimizer=optimizer)
