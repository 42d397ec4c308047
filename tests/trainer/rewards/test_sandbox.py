"""The sandbox settings a trainer reads from its environment, and the per-experiment uids it hands out."""

from __future__ import annotations

import os

import pytest

from loraplex_api import parse_quantity
from loraplex_api.pool import RewardLimitsSpec
from loraplex_trainer.rewards.sandbox import SandboxConfig, UidPool


def test_settings_from_the_environment() -> None:
    config = SandboxConfig.from_env(
        {"LORAPLEX_REWARD_UIDS": "20000-20009", "LORAPLEX_REWARD_PYTHON": "/usr/bin/python3",
         "LORAPLEX_REWARD_CONFINEMENT": "required"}
    )  # fmt: skip
    assert config.uids == range(20000, 20010) and config.python == "/usr/bin/python3"
    assert config.require_confinement
    assert not SandboxConfig.from_env({}).require_confinement


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LORAPLEX_REWARD_UIDS": "lots"},
            r"\$LORAPLEX_REWARD_UIDS: 'lots' is not a uid range like 20000-29999",
        ),
        ({"LORAPLEX_REWARD_UIDS": "0-10"}, r"must be a non-empty range of uids >= 1000"),
        ({"LORAPLEX_REWARD_CONFINEMENT": "yes"}, r"'yes' is not 'required' or 'best-effort'"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SandboxConfig.from_env(env)


def test_pool_limits_and_an_experiments_own_memory() -> None:
    config = SandboxConfig().for_pool(RewardLimitsSpec(memory="1Gi", processes=8))
    assert (config.limits.memory_bytes, config.limits.processes) == (1 << 30, 8)
    assert config.with_memory("3Gi").limits.memory_bytes == parse_quantity("3Gi")
    assert config.with_memory(None) is config


@pytest.mark.skipif(os.geteuid() != 0, reason="uids are handed out only by a root trainer")
def test_uids_are_one_per_experiment_and_come_back() -> None:
    pool = UidPool(range(30000, 30002))
    assert pool.take("a") == 30000 and pool.take("a") == 30000 and pool.take("b") == 30001
    assert pool.take("c") is None  # the range is used up: c shares the trainer's uid
    pool.give_back("a")
    assert pool.take("c") == 30000
