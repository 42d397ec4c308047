"""Rewards: turn an experiment's ``reward`` spec into a batch function of samples -> floats.

A Reward never crashes the trainer: every failure (a bad spec, user code that raises, hangs or
dies, a reward service that errs, a non-finite value) is a RewardError, and the trainer fails
only the experiment that owns the reward.
"""

from .base import Reward, RewardError, Sample, check_rewards
from .builtin import extract_answer, last_number
from .compose import WeightedSum, build_reward
from .http import HTTPRewardClient
from .python_worker import PythonFunctionReward

__all__ = [
    "HTTPRewardClient",
    "PythonFunctionReward",
    "Reward",
    "RewardError",
    "Sample",
    "WeightedSum",
    "build_reward",
    "check_rewards",
    "extract_answer",
    "last_number",
]
