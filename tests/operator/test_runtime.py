"""Tests for the operator's configuration from the environment."""

from __future__ import annotations

import pytest

from loraplex_operator.runtime import OperatorConfig


def test_defaults_suit_a_cluster() -> None:
    config = OperatorConfig.from_env({})
    assert config == OperatorConfig()
    assert config.timing.heartbeat_grace == 120 and config.timing.replica_grace == 60


def test_environment_overrides() -> None:
    config = OperatorConfig.from_env(
        {
            "LORAPLEX_RESYNC_SECONDS": "2.5",
            "LORAPLEX_HEARTBEAT_GRACE_SECONDS": "30",
            "LORAPLEX_REPLICA_GRACE_SECONDS": "15",
            "LORAPLEX_TRAINER_SERVICE_ACCOUNT": "trainer",
        }
    )
    assert (config.resync_seconds, config.heartbeat_grace_seconds, config.replica_grace_seconds) == (
        2.5,
        30,
        15,
    )
    assert config.default_trainer_service_account == "trainer"


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_bad_values_name_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match="LORAPLEX_RESYNC_SECONDS"):
        OperatorConfig.from_env({"LORAPLEX_RESYNC_SECONDS": value})
