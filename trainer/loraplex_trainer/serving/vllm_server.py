"""`vllm serve` as a child process on 127.0.0.1, and waiting for it to answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import ClientError, ClientSession

from ..rollout.vllm_engine import max_lora_rank
from .errors import ServingError

log = logging.getLogger(__name__)

VLLM_START_SECONDS = 1800.0
"""As long as the pod's startupProbe waits: a large model downloads and loads first."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class VLLMServer:
    """``vllm serve`` as a child process, on 127.0.0.1 only."""

    model_folder: Path
    served_name: str
    max_loras: int
    max_lora_rank: int
    dtype: str = "auto"
    extra_args: Sequence[str] = ()
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        rank = max_lora_rank(self.max_lora_rank)  # vLLM accepts a few values; above 512 none
        return [
            sys.executable, "-m", "loraplex_trainer.vllm_launch", "serve", str(self.model_folder),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--served-model-name", self.served_name,
            "--dtype", self.dtype,
            "--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(rank),
            "--max-cpu-loras", str(2 * self.max_loras),
            "--disable-uvicorn-access-log",
            *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # the CPU build would reserve most of the RAM
        log.info("event=vllm_serve_starting command=%r", " ".join(self.command()))
        self.process = subprocess.Popen(self.command(), env=env)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def wait_for_vllm(
    server: VLLMServer, session: ClientSession, timeout: float = VLLM_START_SECONDS
) -> float:
    """Seconds until vLLM answers /health; a vLLM that exits or never answers is a ServingError."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if server.process is not None and server.process.poll() is not None:
            raise ServingError(f"vllm serve exited with code {server.process.returncode} while starting")
        with contextlib.suppress(OSError, ClientError):
            async with session.get(f"{server.url}/health") as response:
                if response.status == 200:
                    return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise ServingError(f"vllm serve did not answer /health within {timeout:.0f} s")
