"""A hostile Python reward, run through `loraplex train` as a process, attacks the trainer and a victim.

The trainer runs as root with a uid range for reward workers, as the reward container of a pod
is set up; the workers run an interpreter every uid may execute. Each attack's outcome comes
back as a line the worker prints (the trainer logs its workers' output), and the victim's final
adapter is compared with a run beside a harmless neighbour of the same shape.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.processes import checkout_env, loraplex
from tests.trainer.test_standalone import manifests

WORKER_PYTHON = "/usr/bin/python3"  # the trainer's interpreter lives under /root (0700) here
SECRET_ENV = "hunter2-env"
SECRET_ROW = "hunter2-row"
UIDS = range(23000, 23010)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.access(WORKER_PYTHON, os.X_OK),
    reason="starting workers as other uids needs root and an interpreter those uids can run",
)

ATTACKER = """
import os, signal, sys, time

DONE = set()
VICTIM = {victim!r}
MODEL = {model!r}
TOKEN = {token!r}


def report(name, outcome):
    if name not in DONE:
        DONE.add(name)
        print(f"ATTACK {{name}}: {{outcome}}", file=sys.stderr, flush=True)


def attempt(name, action):
    try:
        result = action()
    except FileNotFoundError:
        return  # the victim has not written it yet: try again at the next call
    except BaseException as exc:  # noqa: BLE001 - every refusal is the point
        report(name, f"denied {{type(exc).__name__}}")
    else:
        report(name, f"ALLOWED {{str(result)[:60]!r}}")


def read_victim_checkpoint():
    folder = os.path.join(VICTIM, "checkpoints")
    return os.listdir(folder)


def overwrite_victim_optimizer():
    for step in sorted(os.listdir(os.path.join(VICTIM, "checkpoints"))):
        with open(os.path.join(VICTIM, "checkpoints", step, "optimizer.safetensors"), "wb") as f:
            f.write(b"pwned")
    return "written"


def scan_trainer_memory():
    with open(f"/proc/{{os.getppid()}}/mem", "rb") as f:
        return f.read(1)


def read_trainer_environ():
    with open(f"/proc/{{os.getppid()}}/environ", "rb") as f:
        return f.read()


def fork_bomb():
    children = 0
    try:
        for _ in range(500):
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
            children += 1
    except OSError as exc:
        return f"stopped after {{children}} children: {{type(exc).__name__}}"
    return f"{{children}} children"


def outlive():
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        os._exit(0)
    time.sleep(0.2)
    return "spawned"


def reward(prompt, completion, row):
    attempt("read-victim-metrics", lambda: open(os.path.join(VICTIM, "metrics.jsonl")).read())
    attempt("append-victim-metrics", lambda: open(os.path.join(VICTIM, "metrics.jsonl"), "a").write("x"))
    attempt("list-victim-checkpoints", read_victim_checkpoint)
    attempt("overwrite-victim-optimizer", overwrite_victim_optimizer)
    attempt("write-base-model", lambda: open(os.path.join(MODEL, "config.json"), "a").write("x"))
    attempt("read-trainer-memory", scan_trainer_memory)
    attempt("read-trainer-environ", read_trainer_environ)
    attempt("kill-trainer", lambda: os.kill(os.getppid(), signal.SIGKILL))
    attempt("read-service-account-token", lambda: open(TOKEN).read())
    report("env-secret-visible", {secret!r} in repr(dict(os.environ)))
    report("env-keys", ",".join(sorted(os.environ)))
    attempt("allocate-3GiB", lambda: len(bytearray(3 << 30)))
    attempt("outlive", outlive)
    if "fork-bomb" not in DONE:
        report("fork-bomb", fork_bomb())
    if "huge-line" not in DONE:
        DONE.add("huge-line")
        sys.stderr.write("x" * (64 << 20) + "\\n")
        sys.stderr.flush()
    return 0.0
"""

HARMLESS = "def reward(prompt, completion, row):\n    return 0.0\n"


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Path]:
    """A folder every uid may traverse, as a shared disk would be (pytest's own tmp is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="loraplex-security-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def world(parent: Path, model_dir: Path, attacker_source: str) -> tuple[Path, Path]:
    """The run's model, data, reward and manifests, readable by every uid where files would be."""
    root = parent
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    model = root / "model"
    shutil.copytree(model_dir, model)
    for path in [model, *model.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    out = root / "out"
    out.mkdir()
    out.chmod(0o755)
    # A world-readable secret outside the worker's paths, as a pod's service-account token is.
    token = root / "serviceaccount" / "token"
    token.parent.mkdir()
    token.write_text("eyJhbGciOi-not-for-rewards")
    token.parent.chmod(0o755)
    token.chmod(0o644)
    (root / "attacker.py").write_text(
        attacker_source.format(
            victim=str(out / "victim"), model=str(model), secret=SECRET_ENV, token=str(token)
        )
    )

    # The standalone tests' two experiments, renamed: a victim with a builtin reward, the attacker.
    file = manifests(root, model, steps=3)
    pool, victim, attacker = yaml.safe_load_all(file.read_text())
    for doc, name in ((victim, "victim"), (attacker, "attacker")):
        doc["metadata"]["name"] = name
        doc["spec"]["algorithm"]["seed"] = 7
        doc["spec"]["checkpoint"] = {"everySteps": 1, "keepLast": 3}
    victim["spec"]["reward"] = {"builtin": {"name": "length", "args": {"target": 3}}}
    attacker["spec"]["reward"] = {"python": {"file": "attacker.py", "timeoutSeconds": 60}}
    file.write_text(yaml.safe_dump_all([pool, victim, attacker]))
    # manifests() wrote its rows; these carry a secret the attacker must not find.
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1), "note": SECRET_ROW} for i in range(8)]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return file, out


def train(file: Path, out: Path, *, own_uids: bool = True) -> subprocess.CompletedProcess[str]:
    env = checkout_env(LORAPLEX_REWARD_PYTHON=WORKER_PYTHON, LORAPLEX_TEST_SECRET=SECRET_ENV)
    if own_uids:
        env["LORAPLEX_REWARD_UIDS"] = f"{UIDS.start}-{UIDS.stop - 1}"
    command = loraplex("train", str(file), "--output", str(out), "--no-live", "--threads", "1")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def attacks(stderr: str) -> dict[str, str]:
    found = {}
    for line in stderr.splitlines():
        if "ATTACK " in line:
            name, _, outcome = line.split("ATTACK ", 1)[1].partition(": ")
            found[name] = outcome.rstrip("'\")")
    return found


def processes_of(uid: int) -> list[int]:
    """Live processes of a uid (zombies are dead already; they wait only for init to reap them)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (
                    entry.stat().st_uid == uid
                    and (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
                ):
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return pids


def survivors(timeout: float = 10.0) -> list[int]:
    """Processes of the workers' uids still alive after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for uid in UIDS for pid in processes_of(uid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.parametrize("own_uids", [True, False], ids=["own-uid", "trainer-uid"])
def test_a_hostile_reward_reaches_nothing_and_the_victim_trains_as_if_alone(
    own_uids: bool, shared: Path, tiny_model_dir: Path
) -> None:
    """own-uid: a pod's reward uid range. trainer-uid: the worker shares the trainer's uid, as in
    today's trainer pods (uid 1000) and on a laptop; here that uid is root, the hardest case."""
    calm_file, calm_out = world(shared / "calm", tiny_model_dir, HARMLESS)
    calm = train(calm_file, calm_out, own_uids=own_uids)
    assert calm.returncode == 0, calm.stderr[-3000:]

    file, out = world(shared / "hostile", tiny_model_dir, ATTACKER)
    started = time.monotonic()
    hostile = train(file, out, own_uids=own_uids)
    assert hostile.returncode == 0, hostile.stderr[-3000:]
    assert time.monotonic() - started < 240
    seen = attacks(hostile.stderr)

    for name in (
        "read-victim-metrics",
        "append-victim-metrics",
        "list-victim-checkpoints",
        "overwrite-victim-optimizer",
        "write-base-model",
        "read-trainer-memory",
        "read-trainer-environ",
        "kill-trainer",
        "read-service-account-token",
    ):
        assert seen.get(name, "").startswith("denied"), (name, seen)
    assert seen["env-secret-visible"] == "False"
    assert (
        seen["env-keys"] == "HOME,LANG,PATH,PYTHONDONTWRITEBYTECODE,PYTHONNOUSERSITE,PYTHONUNBUFFERED,TMPDIR"
    )
    assert seen["allocate-3GiB"] == "denied MemoryError"
    if own_uids:  # RLIMIT_NPROC counts per uid, and root is exempt from it
        assert seen["fork-bomb"].startswith("stopped after") and int(seen["fork-bomb"].split()[2]) < 40

    # The 64 MiB line reached neither the trainer's output nor its summary in full.
    assert len(hostile.stderr) < 2 << 20
    assert (out / "summary.json").stat().st_size < 64 << 10
    # Only the attacker's reward ran hostile code; everyone completed, and the victim's adapter is
    # bit-identical to the one trained beside a harmless neighbour.
    summary = json.loads((out / "summary.json").read_text())
    assert {n: e["state"] for n, e in summary["experiments"].items()} == {
        "victim": "Completed",
        "attacker": "Completed",
    }
    ours = (out / "victim" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert ours == (calm_out / "victim" / "adapter" / "adapter_model.safetensors").read_bytes()
    if own_uids:  # nothing of the workers' uids outlives the run, not even a detached grandchild
        assert survivors() == []


LIMITS = {
    "memory": ("def reward(p, c, r):\n    return float(len(bytearray(3 << 30)))\n", "MemoryError"),
    "processes": (
        "import os, time\n\ndef reward(p, c, r):\n    while True:\n        if os.fork() == 0:\n"
        "            time.sleep(60)\n            os._exit(0)\n",
        "BlockingIOError",
    ),
}


@pytest.mark.parametrize("limit", sorted(LIMITS))
def test_a_worker_past_its_limits_fails_only_its_experiment_naming_the_limit(
    limit: str, shared: Path, tiny_model_dir: Path
) -> None:
    source, error = LIMITS[limit]
    file, out = world(shared, tiny_model_dir, source)
    done = train(file, out)
    assert done.returncode == 1  # an experiment failed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiments"]["victim"]["state"] == "Completed"
    attacker = summary["experiments"]["attacker"]
    assert attacker["state"] == "Failed" and error in attacker["message"], attacker["message"]
    assert f"limit: {limit}" in attacker["message"], attacker["message"]
    assert survivors() == []
