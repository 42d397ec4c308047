"""The CPU budget the trainer sizes torch's threads by: affinity and the container's quota."""

from __future__ import annotations

import os
from pathlib import Path

from loraplex_trainer.cpus import cgroup_quota, cpu_budget


def test_cgroup_v2_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(tmp_path) == 1.5
    assert cpu_budget(tmp_path) == min(2, len(os.sched_getaffinity(0)))  # 1.5 CPUs: 2 threads, rounded up
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    assert cpu_budget(tmp_path) == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(tmp_path) == 0.5
    assert cpu_budget(tmp_path) == 1  # never below one thread
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path) is None


def test_no_cgroup_means_the_affinity_mask(tmp_path: Path) -> None:
    assert cgroup_quota(tmp_path / "missing") is None
    assert cpu_budget(tmp_path / "missing") == len(os.sched_getaffinity(0))
