"""The operator's in-process state, handed to every handler through kopf's ``memo``: settings, client, wake-ups.

kopf copies ``memo`` shallowly per object, so everything shared lives in one
:class:`Runtime` object that all copies point to.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import kopf

from .kube import KubeClient
from .lifecycle import Timing
from .metrics import OperatorMetrics
from .patches import Ledger

PoolKey = tuple[str, str]
"""``(namespace, pool name)``."""


@dataclass(frozen=True)
class OperatorConfig:
    """Tunables, from the environment (``LORAPLEX_*``), with defaults for a real cluster."""

    resync_seconds: float = 10.0
    """How often a pool's pass runs without any event (deadlines, heartbeats, scale-down delays)."""
    heartbeat_grace_seconds: float = 120.0
    replica_grace_seconds: float = 60.0
    reapply_seconds: float = 300.0
    """How often a pool's children are applied even if unchanged (repairs edits and deletions)."""
    debounce_seconds: float = 0.05
    """After a wake-up, how long a pass waits to take in a burst of events at once."""
    default_trainer_service_account: str | None = None
    default_serving_service_account: str | None = None
    """What serving pods run as (the chart's read-only identity); unset: the trainers' own."""
    serving_url_template: str = "http://{name}.{namespace}.svc:{port}"
    """Where the operator reads a serving Service's /loraplex/served (another for an operator
    outside the cluster, e.g. through a port-forward)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorConfig:
        """Read ``LORAPLEX_RESYNC_SECONDS``, ``LORAPLEX_HEARTBEAT_GRACE_SECONDS``, and so on."""

        def seconds(name: str, default: float) -> float:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{name}: {raw!r} is not a number of seconds") from None
            if value < 0:
                raise ValueError(f"{name}: {raw!r} must not be negative")
            return value

        defaults = cls()
        return cls(
            resync_seconds=seconds("LORAPLEX_RESYNC_SECONDS", defaults.resync_seconds),
            heartbeat_grace_seconds=seconds(
                "LORAPLEX_HEARTBEAT_GRACE_SECONDS", defaults.heartbeat_grace_seconds
            ),
            replica_grace_seconds=seconds("LORAPLEX_REPLICA_GRACE_SECONDS", defaults.replica_grace_seconds),
            reapply_seconds=seconds("LORAPLEX_REAPPLY_SECONDS", defaults.reapply_seconds),
            debounce_seconds=seconds("LORAPLEX_DEBOUNCE_SECONDS", defaults.debounce_seconds),
            default_trainer_service_account=env.get("LORAPLEX_TRAINER_SERVICE_ACCOUNT") or None,
            default_serving_service_account=env.get("LORAPLEX_SERVING_SERVICE_ACCOUNT") or None,
            serving_url_template=env.get("LORAPLEX_SERVING_URL_TEMPLATE") or defaults.serving_url_template,
        )

    @property
    def timing(self) -> Timing:
        """The grace periods the lifecycle decisions use."""
        return Timing(heartbeat_grace=self.heartbeat_grace_seconds, replica_grace=self.replica_grace_seconds)


class Wakeups:
    """One wake-up flag per pool: events set it, the pool's loop waits on it (or its resync period)."""

    def __init__(self) -> None:
        self._flags: dict[PoolKey, asyncio.Event] = {}

    def _flag(self, key: PoolKey) -> asyncio.Event:
        return self._flags.setdefault(key, asyncio.Event())

    def kick(self, key: PoolKey) -> None:
        """Ask the pool's loop for a pass soon."""
        self._flag(key).set()

    async def wait(self, key: PoolKey, *, timeout: float, stopped: kopf.DaemonStopped) -> bool:
        """Sleep until a kick, the timeout or the daemon's stop; whether it was a kick."""
        flag = self._flag(key)
        kicked = asyncio.ensure_future(flag.wait())
        halted = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait({kicked, halted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            kicked.cancel()
            halted.cancel()
        was_kicked = flag.is_set()
        flag.clear()
        return was_kicked

    def forget(self, key: PoolKey) -> None:
        """Drop a deleted pool's flag."""
        self._flags.pop(key, None)


@dataclass
class Runtime:
    """Everything the handlers share."""

    config: OperatorConfig
    api: KubeClient
    metrics: OperatorMetrics
    ledger: Ledger = field(default_factory=Ledger)
    wakeups: Wakeups = field(default_factory=Wakeups)
