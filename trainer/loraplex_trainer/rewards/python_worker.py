"""``reward.python``: the user's ``def f(prompt, completion, row) -> float`` in its own worker process.

The function runs in a fresh interpreter (``worker_main.py``) that is sent nothing but samples,
so user code can neither see nor corrupt the trainer's state, and a hang or crash costs only
that worker. One worker lives as long as the experiment, so the user's imports run once; after a
timeout or a crash it is replaced on the next call.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from loraplex_api.experiment import PythonReward as PythonRewardSpec

from ..sources import config_map_text, resolve_file
from .base import RewardError, Sample, check_rewards, user_row
from .sandbox import OUTPUT_LINE_BYTES, REPLY_BYTES, SandboxConfig, WorkerHome, kill_all

logger = logging.getLogger(__name__)

# Loading may import heavy libraries once; give it longer than a batch gets.
MIN_STARTUP_SECONDS = 60.0
_STDERR_TAIL_LINES = 20
_LOGGED_LINES = 200
"""Lines of a worker's output logged at most; the rest is dropped (the tail is still kept)."""


class _WorkerGone(Exception):
    """The worker's stdout closed: the process exited or was killed."""


class _Worker:
    """One worker process, started in its sandbox, and the threads that drain its pipes (bounded)."""

    def __init__(self, home: WorkerHome, function: str, sandbox: SandboxConfig) -> None:
        self.home = home
        self.python = sandbox.python
        own_uid = home.uid is not None
        config = sandbox.limits.worker_config(own_uid=own_uid)
        self.process = subprocess.Popen(
            [self.python, str(home.script), str(home.source), function, json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=home.path,
            env=home.environment(),
            # Its own process group, so a kill also ends whatever the user's code started.
            start_new_session=True,
            user=home.uid if own_uid else None,
            group=home.uid if own_uid else None,
            extra_groups=[] if own_uid else None,
        )
        self.replies: queue.Queue[bytes | None] = queue.Queue()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self.logged_lines = 0
        assert self.process.stdout is not None and self.process.stderr is not None
        threading.Thread(target=self._drain_stdout, args=(self.process.stdout,), daemon=True).start()
        self._stderr_thread = threading.Thread(
            target=self._drain_stderr, args=(self.process.stderr, home.source.name), daemon=True
        )
        self._stderr_thread.start()

    def _drain_stdout(self, stream: IO[bytes]) -> None:
        while True:
            line = stream.readline(REPLY_BYTES + 1)
            if not line:
                break
            if len(line) > REPLY_BYTES:
                self.replies.put(b"")  # too large: receive() reports it, the caller kills the worker
                break
            self.replies.put(line)
        self.replies.put(None)

    def _drain_stderr(self, stream: IO[bytes], name: str) -> None:
        # Drained continuously so a chatty reward never blocks on a full pipe; each line is cut to
        # OUTPUT_LINE_BYTES and only a short tail is kept, whatever the worker writes.
        while True:
            chunk = stream.readline(OUTPUT_LINE_BYTES)
            if not chunk:
                return
            cut = not chunk.endswith(b"\n")
            while cut:  # skip the rest of an overlong line without holding it
                rest = stream.readline(OUTPUT_LINE_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
            text = chunk.decode(errors="replace").rstrip("\n") + (" [line cut]" if cut else "")
            self.stderr_tail.append(text)
            if self.logged_lines < _LOGGED_LINES:
                logger.info("reward_output file=%s line=%r", name, text)
            elif self.logged_lines == _LOGGED_LINES:
                logger.info("reward_output file=%s further output is not logged", name)
            self.logged_lines += 1

    def send(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write((json.dumps(message) + "\n").encode())
            self.process.stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise _WorkerGone from error

    def receive(self, timeout: float) -> dict[str, Any]:
        """The next reply; raises queue.Empty after ``timeout`` seconds, _WorkerGone at end of output.

        A line that is not JSON, or larger than REPLY_BYTES, raises ValueError.
        """
        line = self.replies.get(timeout=timeout)
        if line is None:
            raise _WorkerGone
        if not line:
            raise ValueError(f"a reply over {REPLY_BYTES} bytes")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def exit_description(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def stderr_text(self) -> str:
        # After an exit the drain thread may still hold the last lines, which explain the exit.
        self._stderr_thread.join(timeout=1)
        tail = "\n".join(self.stderr_tail)
        return f"; its last output:\n{tail}" if tail else ""

    def kill(self) -> None:
        """End the worker and everything it started, and delete its folder."""
        if self.process.poll() is None or self.home.uid is not None:
            kill_all(self.home.uid, self.process.pid, self.python)
        self.process.wait()
        self.home.remove()

    def stop(self) -> None:
        """Ask the worker to exit by closing its input; kill it (and all it started) if it does not."""
        try:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class PythonFunctionReward:
    """Calls the user's function from ``path`` in a worker process, one batch per request."""

    def __init__(
        self,
        path: Path,
        function: str,
        *,
        timeout_seconds: float,
        where: str,
        display: str,
        answer_field: str = "answer",
        temp_dir: Path | None = None,
        sandbox: SandboxConfig | None = None,
        uid: int | None = None,
    ) -> None:
        """Start the worker and load the function; a bad file or function raises RewardError now.

        ``uid`` is the experiment's own uid for its workers (from the trainer's uid range), or None.
        """
        self.path = path
        self.sandbox = sandbox or SandboxConfig()
        self.uid = uid
        self.function = function
        self.timeout_seconds = timeout_seconds
        self._where = where
        self._name = f"{display}:{function}"
        self._answer_field = answer_field
        self._temp_dir = temp_dir  # a ConfigMap's text written out for the worker; ours to delete
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._closed = False
        try:
            self._worker = self._start()
        except RewardError:
            self.close()
            raise

    def _start(self) -> _Worker:
        try:
            home = WorkerHome.create(self.path, self.uid)
        except OSError as error:
            raise RewardError(f"{self._where}: cannot prepare a worker for {self._name}: {error}") from None
        try:
            worker = _Worker(home, self.function, self.sandbox)
        except OSError as error:
            home.remove()
            raise RewardError(f"{self._where}: cannot start a worker for {self._name}: {error}") from None
        startup = max(MIN_STARTUP_SECONDS, self.timeout_seconds)
        try:
            reply = worker.receive(startup)
        except queue.Empty:
            worker.kill()
            raise RewardError(f"{self._where}: {self._name} did not load within {startup:g}s") from None
        except _WorkerGone:
            message = f"{self._where}: the worker loading {self._name} {worker.exit_description()}{worker.stderr_text()}"
            worker.kill()
            raise RewardError(message) from None
        if "error" in reply:
            worker.stop()
            raise RewardError(f"{self._where}: cannot load {self._name}: {self._describe(reply['error'])}")
        confinement = reply.get("confinement") or {}
        logger.info(
            "reward_worker_started function=%s pid=%d uid=%s landlock_abi=%s signals_confined=%s",
            self._name, worker.process.pid, self.uid, confinement.get("landlock_abi"),
            confinement.get("signals_confined"),
        )  # fmt: skip
        if self.uid is None and not confinement.get("landlock_abi"):
            if self.sandbox.require_confinement:
                worker.stop()
                raise RewardError(
                    f"{self._where}: {self._name} cannot be confined on this node: its kernel has no "
                    "Landlock and the trainer has no uid range for reward workers; the pod requires "
                    "confinement (LORAPLEX_REWARD_CONFINEMENT=required)"
                )
            logger.warning(
                "reward_worker_unconfined function=%s: no Landlock in this kernel and no uid of its own, "
                "so the worker can read and write what the trainer's uid can",
                self._name,
            )
        return worker

    def _describe(self, error: dict[str, Any]) -> str:
        where = [f"sample {error['sample']}"] if error.get("sample") is not None else []
        if error.get("line") is not None:
            where.append(f"{self.path.name} line {error['line']}")
        suffix = f" ({', '.join(where)})" if where else ""
        return f"{error['type']}: {error['message']}{suffix}"

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        """Score a batch in the worker within ``timeout_seconds``; any failure raises RewardError."""
        if not samples:
            return []
        with self._lock:
            if self._closed:
                raise RewardError(f"{self._where}: {self._name} was called after close()")
            worker = self._worker if self._worker is not None else self._start()
            self._worker = worker
            request = {
                "samples": [[s.prompt, s.completion, user_row(s.row, self._answer_field)] for s in samples]
            }
            try:
                worker.send(request)
                reply = worker.receive(self.timeout_seconds)
            except queue.Empty:
                worker.kill()
                self._worker = None
                raise RewardError(
                    f"{self._where}: {self._name} did not return within {self.timeout_seconds:g}s "
                    f"for a batch of {len(samples)}; the worker was killed and restarts on the next call"
                ) from None
            except _WorkerGone:
                self._worker = None
                message = (
                    f"{self._where}: the worker running {self._name} {worker.exit_description()} "
                    f"while scoring a batch of {len(samples)}{worker.stderr_text()}"
                )
                worker.kill()  # whatever it started goes with it
                raise RewardError(message) from None
            except ValueError as error:
                worker.kill()
                self._worker = None
                what = str(error) if "bytes" in str(error) else "a garbled reply"
                raise RewardError(f"{self._where}: the worker running {self._name} sent {what}") from None
            except TypeError as error:  # a row that JSON cannot carry
                raise RewardError(
                    f"{self._where}: cannot send the samples to {self._name}: {error}"
                ) from None
        if "error" in reply:
            if reply["error"].get("traceback"):
                logger.warning("reward_raised function=%s\n%s", self._name, reply["error"]["traceback"])
            raise RewardError(f"{self._where}: {self._name} raised {self._describe(reply['error'])}")
        return check_rewards(reply["rewards"], len(samples), f"{self._where}: {self._name}")

    def close(self) -> None:
        """Stop the worker and delete the ConfigMap copy, if any."""
        with self._lock:
            self._closed = True
            if self._worker is not None:
                self._worker.stop()
                self._worker = None
            if self._temp_dir is not None:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
                self._temp_dir = None


def build_python(
    spec: PythonRewardSpec,
    *,
    where: str,
    base_dir: Path,
    config_maps: Mapping[tuple[str, str], str] | None,
    answer_field: str,
    sandbox: SandboxConfig | None = None,
    uid: int | None = None,
) -> PythonFunctionReward:
    """Resolve the function's source (a file under ``base_dir`` or ConfigMap text) and start its worker."""
    if spec.file is not None:
        return PythonFunctionReward(
            resolve_file(spec.file, base_dir, where=where, error=RewardError),
            spec.function,
            timeout_seconds=spec.timeout_seconds,
            where=where,
            display=spec.file,
            answer_field=answer_field,
            sandbox=(sandbox or SandboxConfig()).with_memory(spec.memory),
            uid=uid,
        )
    assert spec.config_map is not None  # the model guarantees exactly one source
    ref = spec.config_map
    text = config_map_text(ref, config_maps, where=where, error=RewardError)
    temp_dir = Path(tempfile.mkdtemp(prefix="loraplex-reward-"))
    # The key is the file name (ConfigMap keys are safe file names); a .py suffix makes tracebacks read well.
    path = temp_dir / (ref.key if ref.key.endswith(".py") else f"{ref.key}.py")
    path.write_text(text, encoding="utf-8")
    return PythonFunctionReward(
        path,
        spec.function,
        timeout_seconds=spec.timeout_seconds,
        where=where,
        display=f"configMap {ref.name}/{ref.key}",
        answer_field=answer_field,
        sandbox=(sandbox or SandboxConfig()).with_memory(spec.memory),
        uid=uid,
        temp_dir=temp_dir,
    )
