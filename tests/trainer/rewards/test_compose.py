"""Summed reward terms and the builder's dispatch."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex_api.experiment import RewardSpec
from loraplex_trainer.rewards import RewardError, Sample, WeightedSum, build_reward


def test_terms_are_a_weighted_sum(tmp_path: Path) -> None:
    (tmp_path / "bonus.py").write_text("def reward(prompt, completion, row):\n    return 0.5\n")
    spec = RewardSpec.model_validate(
        {
            "terms": [
                {"weight": 1.0, "builtin": {"name": "exact_match"}},
                {"weight": 0.2, "builtin": {"name": "format", "args": {"pattern": r"\d+"}}},
                {"weight": -2.0, "python": {"file": "bonus.py"}},
            ]
        }
    )
    reward = build_reward(spec, base_dir=tmp_path)
    assert isinstance(reward, WeightedSum)
    try:
        values = reward([Sample("p", "7", {"answer": "7"}), Sample("p", "seven", {"answer": "7"})])
    finally:
        reward.close()
    assert values == pytest.approx([1.0 + 0.2 - 1.0, 0.0 + 0.0 - 1.0])


def test_term_errors_name_the_term() -> None:
    spec = RewardSpec.model_validate(
        {
            "terms": [
                {"builtin": {"name": "exact_match"}},
                {"builtin": {"name": "length", "args": {"tagret": 3}}},
            ]
        }
    )
    with pytest.raises(
        RewardError, match=r"reward\.terms\[1\]\.builtin\.args\.target: required .*given: tagret"
    ):
        build_reward(spec, base_dir=Path("."))


def test_failed_build_closes_the_terms_already_built(tmp_path: Path) -> None:
    (tmp_path / "ok.py").write_text("def reward(prompt, completion, row):\n    return 1.0\n")
    spec = RewardSpec.model_validate(
        {"terms": [{"python": {"file": "ok.py"}}, {"python": {"file": "missing.py"}}]}
    )
    closed: list[object] = []
    original = WeightedSum.close

    def spy(self: WeightedSum) -> None:
        closed.extend(reward for _, reward in self.terms)
        original(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WeightedSum, "close", spy)
        with pytest.raises(RewardError, match=r"reward\.terms\[1\]\.python\.file: missing\.py"):
            build_reward(spec, base_dir=tmp_path)
    assert len(closed) == 1
    assert closed[0]._worker is None  # type: ignore[attr-defined]


def test_overflowing_sum_is_rejected() -> None:
    spec = RewardSpec.model_validate(
        {"terms": [{"weight": 1000, "builtin": {"name": "length", "args": {"target": 1}}}] * 2}
    )
    reward = build_reward(spec, base_dir=Path("."))
    assert reward([Sample("p", "", {})]) == [2000.0]
