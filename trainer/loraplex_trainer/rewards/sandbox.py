"""Where a user's Python reward runs: a worker process that reaches only its own inputs.

Every worker gets, whatever the host allows:

- a private working folder (mode 0700) holding copies of the worker script and the user's
  file, and nothing else of the trainer's;
- a scrubbed environment (PATH, HOME, LANG, TMPDIR and nothing the trainer has: no tokens,
  no credentials, no ``KUBERNETES_*``);
- limits it sets on itself before any user code runs (``worker_main.py``): address space,
  file size, open files, no core dumps; and the number of processes when it has a uid of its
  own; and it dies with the trainer (PR_SET_PDEATHSIG), so it cannot outlive it;
- bounded output: stderr is read a line of at most ``OUTPUT_LINE_BYTES`` at a time and only a
  short tail is kept; a reply larger than ``REPLY_BYTES`` is refused.

When the trainer runs as root and is given a range of uids (``LORAPLEX_REWARD_UIDS``, as the
reward container of a pod would be), each experiment's worker also runs as a uid of its own
with no supplementary groups. Files the trainer writes are private (umask 027, see
``harden_trainer``), so such a worker cannot read or write other experiments' adapters,
checkpoints, datasets or rewards, cannot signal the trainer or other workers, and all of its
processes are killed together when it ends. The trainer itself is made non-dumpable, so even
a worker of the same uid cannot read ``/proc/<trainer>/mem`` or ``environ`` or ptrace it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from loraplex_api import parse_quantity
from loraplex_api.pool import RewardLimitsSpec
from loraplex_api.wire import REWARD_CONFINEMENT_ENV, REWARD_PYTHON_ENV, REWARD_UIDS_ENV

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("worker_main.py")
OUTPUT_LINE_BYTES = 4096
"""A line of the worker's stderr kept for logs and error messages at most (the rest is dropped)."""
REPLY_BYTES = 16 << 20
"""A reply (one batch's rewards) at most; a worker sending more is killed."""
_PR_SET_DUMPABLE = 4
MAX_SIBLING_BYTES = 1 << 20
"""A .py file beside the reward is copied into the worker's home (helper modules) up to this size."""


@dataclass(frozen=True)
class Limits:
    """What one reward worker may use."""

    memory_bytes: int = 2 << 30
    """Address space, not resident memory: the interpreter and its imports take their share."""
    file_bytes: int = 16 << 20
    open_files: int = 128
    processes: int = 32
    """Enforced when the worker has a uid of its own (the kernel counts processes per uid)."""

    def worker_config(self, *, own_uid: bool) -> dict[str, int | bool]:
        """The JSON config worker_main.py confines itself by (its third argument)."""
        return {
            "memory_bytes": self.memory_bytes,
            "file_bytes": self.file_bytes,
            "open_files": self.open_files,
            "processes": self.processes,
            "own_uid": own_uid,
            "parent": os.getpid(),
        }


@dataclass(frozen=True)
class SandboxConfig:
    """How workers are started in this trainer process."""

    python: str = sys.executable
    uids: range | None = None
    """Per-experiment uids to run workers as; only usable when the trainer is root."""
    limits: Limits = Limits()
    require_confinement: bool = False
    """Refuse to run a worker that has neither Landlock nor a uid of its own (trainer pods)."""

    def for_pool(self, limits: RewardLimitsSpec) -> SandboxConfig:
        """The same, with the pool's ``trainer.rewardLimits``."""
        return replace(
            self,
            limits=replace(
                self.limits, memory_bytes=parse_quantity(limits.memory), processes=limits.processes
            ),
        )

    def with_memory(self, memory: str | int | None) -> SandboxConfig:
        """The same, with an experiment's own ``reward.python.memory`` when it gives one."""
        if memory is None:
            return self
        return replace(self, limits=replace(self.limits, memory_bytes=parse_quantity(memory)))

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> SandboxConfig:
        """``LORAPLEX_REWARD_PYTHON`` (an interpreter the workers' uids can run) and ``LORAPLEX_REWARD_UIDS`` (``20000-29999``)."""
        uids = None
        text = env.get(REWARD_UIDS_ENV, "").strip()
        if text:
            low, _, high = text.partition("-")
            try:
                uids = range(int(low), int(high or low) + 1)
            except ValueError:
                raise ValueError(
                    f"${REWARD_UIDS_ENV}: {text!r} is not a uid range like 20000-29999"
                ) from None
            if uids.start < 1000 or not uids:
                raise ValueError(f"${REWARD_UIDS_ENV}: {text!r} must be a non-empty range of uids >= 1000")
        required = env.get(REWARD_CONFINEMENT_ENV, "").strip()
        if required not in ("", "required", "best-effort"):
            raise ValueError(f"${REWARD_CONFINEMENT_ENV}: {required!r} is not 'required' or 'best-effort'")
        return cls(
            python=env.get(REWARD_PYTHON_ENV) or sys.executable,
            uids=uids,
            require_confinement=required == "required",
        )


class UidPool:
    """Hands out one uid per experiment from the configured range; None when workers share the trainer's."""

    def __init__(self, uids: range | None) -> None:
        usable = uids is not None and os.geteuid() == 0
        if uids is not None and not usable:
            log.warning("event=reward_uids_unused reason=trainer-is-not-root uids=%s", uids)
        self._free = list(uids) if usable and uids is not None else []
        self._taken: dict[str, int] = {}

    def take(self, owner: str) -> int | None:
        if owner in self._taken:
            return self._taken[owner]
        if not self._free:
            return None
        self._taken[owner] = uid = self._free.pop(0)
        return uid

    def give_back(self, owner: str) -> None:
        uid = self._taken.pop(owner, None)
        if uid is not None:
            self._free.append(uid)


@dataclass
class WorkerHome:
    """A worker's private folder: its cwd, HOME and TMPDIR, with copies of the script and the user's file."""

    path: Path
    script: Path
    source: Path
    uid: int | None

    @classmethod
    def create(cls, source: Path, uid: int | None) -> WorkerHome:
        """A new home for one worker of ``source``; the .py files beside it come along (helper modules)."""
        path = Path(tempfile.mkdtemp(prefix="loraplex-reward-"))  # mode 0700
        script = path / WORKER_SCRIPT.name
        shutil.copyfile(WORKER_SCRIPT, script)
        user = path / "user"
        user.mkdir()
        copies = [script, user]
        for sibling in sorted(source.parent.glob("*.py")) if source.parent.is_dir() else []:
            if sibling.is_file() and sibling.stat().st_size <= MAX_SIBLING_BYTES:
                shutil.copyfile(sibling, user / sibling.name)
                copies.append(user / sibling.name)
        copy = user / source.name
        if not copy.exists():
            shutil.copyfile(source, copy)
            copies.append(copy)
        if uid is not None:
            for item in (path, *copies):
                os.chown(item, uid, uid)
        return cls(path, script, copy, uid)

    def environment(self) -> dict[str, str]:
        """All the worker inherits: nothing of the trainer's own environment."""
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(self.path),
            "TMPDIR": str(self.path),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def kill_all(uid: int | None, pgid: int, python: str) -> None:
    """Kill every process of a worker: by uid when it has its own (no process escapes), else by group."""
    if uid is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        return
    # kill(-1) run as the worker's uid reaches exactly the processes of that uid, whatever their
    # group or session; a short-lived process of that uid does it, so the trainer keeps its own.
    subprocess.run(
        [python, "-c", "import os, signal; os.kill(-1, signal.SIGKILL)"],
        user=uid, group=uid, extra_groups=[], env={}, check=False, timeout=30,
    )  # fmt: skip


def harden_trainer() -> None:
    """Make the trainer's memory, environment and files unreachable for reward workers.

    Non-dumpable: /proc/<pid>/mem, environ and ptrace are refused to other processes of the
    same uid. Umask 027: what the trainer creates is its own and its group's (a pod's fsGroup,
    which a serving pod may share); workers with a uid of their own have no such group.
    """
    os.umask(0o027)
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            log.warning("event=prctl_failed errno=%d", ctypes.get_errno())
