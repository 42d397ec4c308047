"""Build any ``reward`` spec into a Reward, and ``terms``: the weighted sum of several rewards."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from loraplex_api.experiment import RewardSource, RewardSpec

from .base import Reward, RewardError, Sample, check_rewards
from .builtin import build_builtin
from .http import build_http
from .python_worker import build_python
from .sandbox import SandboxConfig


class WeightedSum:
    """``sum(weight * reward(samples))`` over the terms, sample by sample."""

    def __init__(self, terms: Sequence[tuple[float, Reward]], *, where: str) -> None:
        self.terms = list(terms)
        self._where = where

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        """Score the batch with every term and add them up with their weights."""
        totals = [0.0] * len(samples)
        for weight, reward in self.terms:
            for i, value in enumerate(reward(samples)):
                totals[i] += weight * value
        # Finite terms can still overflow to inf once weighted.
        return check_rewards(totals, len(samples), self._where)

    def close(self) -> None:
        """Close every term, even when one of them fails to close."""
        errors = []
        for _, reward in self.terms:
            try:
                reward.close()
            except Exception as error:  # the other terms must still be closed
                errors.append(error)
        if errors:
            raise errors[0]


def build_reward(
    spec: RewardSpec | RewardSource,
    *,
    base_dir: Path,
    config_maps: Mapping[tuple[str, str], str] | None = None,
    answer_field: str = "answer",
    where: str = "reward",
    sandbox: SandboxConfig | None = None,
    uid: int | None = None,
) -> Reward:
    """Turn an experiment's ``reward`` spec into a callable Reward; errors name the spec field.

    ``base_dir`` is where relative python files resolve (the manifest's folder standalone, a
    mounted folder in a cluster). ``config_maps`` maps (ConfigMap name, key) to its text; the
    cluster agent supplies it, and without it a configMap source is a RewardError. ``answer_field``
    is the dataset's answerField. The caller owns the result and must ``close()`` it.
    """
    if isinstance(spec, RewardSpec) and spec.terms is not None:
        built: list[tuple[float, Reward]] = []
        try:
            for i, term in enumerate(spec.terms):
                reward = build_reward(
                    term,
                    base_dir=base_dir,
                    config_maps=config_maps,
                    answer_field=answer_field,
                    where=f"{where}.terms[{i}]",
                    sandbox=sandbox,
                    uid=uid,
                )
                built.append((term.weight, reward))
        except BaseException:
            # Terms built before the failing one may hold worker processes.
            WeightedSum(built, where=where).close()
            raise
        return WeightedSum(built, where=where)
    if spec.builtin is not None:
        return build_builtin(spec.builtin, where=f"{where}.builtin", answer_field=answer_field)
    if spec.python is not None:
        return build_python(
            spec.python,
            where=f"{where}.python",
            base_dir=base_dir,
            config_maps=config_maps,
            answer_field=answer_field,
            sandbox=sandbox,
            uid=uid,
        )
    if spec.http is not None:
        return build_http(spec.http, where=f"{where}.http", answer_field=answer_field)
    raise RewardError(f"{where}: set exactly one of builtin, python, http, terms")
