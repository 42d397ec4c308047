"""Graceful shutdown on SIGTERM and SIGINT: finish the step, checkpoint, say so, exit 0.

Kubernetes sends SIGTERM on preemption, eviction, scale-down and node drain, then SIGKILL after
``terminationGracePeriodSeconds``. The first SIGTERM or SIGINT only asks the loop to stop after
the step in flight; the caller then checkpoints every active experiment and reports them
``Interrupted``. A second signal means "now": the process exits at once, without checkpoints.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """A stop request that signal handlers (or callers) set once; a second signal exits the process."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()
        self.reason = ""

    def install(self) -> GracefulStop:
        """Handle SIGTERM and SIGINT in this process (only possible from the main thread)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def request(self, reason: str) -> None:
        """Ask for a graceful stop (what the first signal does)."""
        if not self.event.is_set():
            self.reason = reason
            self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.event.is_set():
            log.warning("event=exit_now signal=%s reason=second-signal", name)
            os._exit(128 + signum)
        log.warning("event=stopping signal=%s: finishing the step, then checkpointing", name)
        self.request(f"stopped by {name}")
