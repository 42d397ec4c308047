"""`loraplex operator` as a user runs it: a process with KUBECONFIG, a namespace, liveness and metrics endpoints."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import urllib.request

from tests.processes import checkout_env

from .builders import pool
from .conftest import Cluster, wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_cli_runs_the_operator_with_liveness_and_metrics(cluster: Cluster) -> None:
    health, metrics = free_port(), free_port()
    env = checkout_env(KUBECONFIG=str(cluster.kubeconfig), LORAPLEX_RESYNC_SECONDS="1")
    command = [sys.executable, "-m", "loraplex_cli", "operator", "--namespace", "default", "--standalone"]
    command += [f"--liveness=http://127.0.0.1:{health}/healthz", f"--metrics-port={metrics}"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(
            lambda: {"sharedbasepools", "loraexperiments", "pods"} <= cluster.server.watched(), timeout=30
        )
        cluster.api.create(pool("cli"))
        wait_for(lambda: cluster.api.get("StatefulSet", "cli"), what="the StatefulSet")
        with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=5) as response:
            assert response.status == 200
        wait_for(lambda: "loraplex_reconcile_total" in scrape(metrics), what="operator metrics")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output[-3000:]
    assert "pool loop started namespace=default pool=cli" in output


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def test_conflicting_flags_are_refused() -> None:
    from loraplex_cli.main import build_parser
    from loraplex_operator.main import run

    args = build_parser().parse_args(["operator", "--namespace", "a", "--all-namespaces"])
    assert run(args) == 2
    args = build_parser().parse_args(["operator", "--peering", "ha", "--standalone"])
    assert run(args) == 2
