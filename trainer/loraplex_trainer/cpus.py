"""How many CPUs this process may really use: its affinity mask, then its container's CPU quota.

torch sizes its intra-op pool by the node's cores. In a pod limited to 2 CPUs on a 64-core node,
64 threads then fight over 2 CPUs' worth of time and spin at every barrier; steps were 10-20x
slower with more threads than CPUs. The trainer sets torch's threads to this number instead.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cpu_budget(cgroup: Path = CGROUP) -> int:
    """CPUs available to this process: min(affinity, cgroup quota rounded up), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota(cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def cgroup_quota(cgroup: Path = CGROUP) -> float | None:
    """The CPU limit of the cgroup in CPUs (``cpu.max`` in v2, ``cfs_quota_us`` in v1); None when unlimited."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # v2: "200000 100000" or "max 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
