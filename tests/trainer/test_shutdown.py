"""SIGTERM and SIGINT as Kubernetes and a terminal send them, to `loraplex train` running as a process."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from loraplex_trainer.checkpoint import list_checkpoints, verify
from tests.processes import checkout_env, loraplex

from .test_standalone import manifests

NAMES = ("short", "digits")


def long_run(tmp_path: Path, model_dir: Path) -> Path:
    """The standalone manifests with many steps and no periodic checkpoint before the signal comes."""
    file = manifests(tmp_path, model_dir, steps=200)
    docs = list(yaml.safe_load_all(file.read_text()))
    for doc in docs[1:]:
        doc["spec"]["checkpoint"] = {"everySteps": 1000, "keepLast": 2}
    file.write_text(yaml.safe_dump_all(docs))
    return file


def start(file: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    command = loraplex("train", str(file), "--output", str(out), "--no-live", "--threads", "1", *extra)
    return subprocess.Popen(command, env=checkout_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def steps_done(out: Path, name: str) -> int:
    path = out / name / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_steps(process: subprocess.Popen[bytes], out: Path, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while min(steps_done(out, n) for n in NAMES) < steps:
        assert process.poll() is None, process.communicate()[0].decode()[-2000:]
        assert time.monotonic() < deadline, "the run did not reach its steps"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_every_experiment_and_the_rerun_loses_no_step(
    sig: signal.Signals, tmp_path: Path, tiny_model_dir: Path
) -> None:
    file, out = long_run(tmp_path, tiny_model_dir), tmp_path / "out"
    process = start(file, out)
    try:
        wait_for_steps(process, out, 2)
        process.send_signal(sig)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output.decode()[-2000:]
    assert b"checkpointed 2 experiment(s)" in output

    summary = json.loads((out / "summary.json").read_text())
    at_signal = {}
    for name in NAMES:
        exp = summary["experiments"][name]
        assert exp["state"] == "Interrupted", exp
        steps = steps_done(out, name)
        # The step in flight was finished, then checkpointed: nothing is lost.
        assert [s for s, _ in list_checkpoints(out / name / "checkpoints")] == [steps] == [exp["steps"]]
        assert verify(out / name / "checkpoints" / f"step-{steps:08d}") is None
        at_signal[name] = steps

    # Resume: one more step each, starting exactly where the signal stopped the run.
    target = max(at_signal.values()) + 1
    rerun = start(file, out, "--max-steps", str(target))
    output, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, output.decode()[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    for name in NAMES:
        lines = [json.loads(x)["step"] for x in (out / name / "metrics.jsonl").read_text().splitlines()]
        assert lines == list(range(1, target + 1))
        assert summary["experiments"][name]["state"] == "Completed"
    assert summary["totals"]["shared_steps"] == target - min(at_signal.values())


def test_a_second_signal_exits_at_once(tmp_path: Path, tiny_model_dir: Path) -> None:
    file, out = long_run(tmp_path, tiny_model_dir), tmp_path / "out"
    # A slow reward keeps every step in flight for seconds, so both signals land inside one step.
    (tmp_path / "slow.py").write_text(
        "import time\n\ndef reward(p, c, row):\n    time.sleep(0.5)\n    return 0.0\n"
    )
    docs = list(yaml.safe_load_all(file.read_text()))
    docs[1]["spec"]["reward"] = {"python": {"file": "slow.py", "function": "reward", "timeoutSeconds": 30}}
    file.write_text(yaml.safe_dump_all(docs))
    process = start(file, out)
    try:
        wait_for_steps(process, out, 1)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # two signals inside one C call would reach Python's handler as one
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        process.communicate(timeout=30)
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM
