"""Benchmark: what confining a Python reward worker costs, at start and per call.

Runs the quickstart's sorted_prefix reward in the real worker (rewards/worker_main.py) twice, side
by side: confined as the trainer starts it (private home, scrubbed env, limits, Landlock,
seccomp), and unconfined (the same script without its config). Prints the start time and the
per-call time for batches of 8 samples (one experiment's quickstart step), and the differences.
Usage: ``python bench/bench_reward_sandbox.py [--calls N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

try:
    import loraplex_trainer  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path[:0] = [str(Path(__file__).resolve().parents[1] / p) for p in ("api", "trainer")]

from loraplex_trainer.rewards.sandbox import SandboxConfig, WorkerHome

ROOT = Path(__file__).resolve().parents[1]

REWARD = ROOT / "examples" / "quickstart" / "rewards.py"
SAMPLES = [["Sort: 3 1 2", "1 2 3", {"prompt": "Sort: 3 1 2", "answer": "1 2 3", "numbers": [3, 1, 2]}]] * 8


def run(confined: bool, calls: int) -> tuple[float, float]:
    """(seconds to start and load, mean seconds per call)."""
    home = WorkerHome.create(REWARD, None)
    config = SandboxConfig().limits.worker_config(own_uid=False)
    argv = [sys.executable, str(home.script), str(home.source), "sorted_prefix"]
    if confined:
        argv.append(json.dumps(config))
    started = time.perf_counter()
    worker = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=home.path,
        env=home.environment() if confined else dict(os.environ), text=True,
    )  # fmt: skip
    assert worker.stdin is not None and worker.stdout is not None
    ready = json.loads(worker.stdout.readline())
    assert ready.get("ready"), ready
    start = time.perf_counter() - started
    message = json.dumps({"samples": SAMPLES}) + "\n"
    began = time.perf_counter()
    for _ in range(calls):
        worker.stdin.write(message)
        worker.stdin.flush()
        reply = json.loads(worker.stdout.readline())
        assert "rewards" in reply, reply
    per_call = (time.perf_counter() - began) / calls
    worker.stdin.close()
    worker.wait()
    home.remove()
    return start, per_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {True: [], False: []}
    for _ in range(args.repeats):  # interleaved, so drift hits both
        for confined in (False, True):
            results[confined].append(run(confined, args.calls))
    for confined in (False, True):
        start = min(r[0] for r in results[confined])
        call = min(r[1] for r in results[confined])
        print(
            f"{'confined' if confined else 'plain':9s} start {start * 1000:7.1f} ms   per call {call * 1000:6.3f} ms"
        )
    d_start = min(r[0] for r in results[True]) - min(r[0] for r in results[False])
    d_call = min(r[1] for r in results[True]) - min(r[1] for r in results[False])
    print(
        f"confinement adds {d_start * 1000:.1f} ms at start and {d_call * 1000:.3f} ms per call (best of {args.repeats})"
    )


if __name__ == "__main__":
    main()
