"""Rollout engines: generate completions for rows of many adapters in one batch."""

from loraplex_trainer.rollout.base import Completion, GenerationRequest, RolloutEngine

__all__ = ["Completion", "GenerationRequest", "RolloutEngine"]
