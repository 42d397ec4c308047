"""The trainer's Prometheus metrics: names, labels, and series removed with their experiment."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from loraplex_trainer.loop import StepReport, Timings
from loraplex_trainer.metrics import TrainerMetrics, resident_bytes


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_a_step_counts_steps_rewards_tokens_and_time() -> None:
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)
    metrics.track("a")
    metrics.track("b")
    assert value(registry, "loraplex_trainer_steps_total", experiment="a") == 0
    assert value(registry, "loraplex_trainer_tokens_total", phase="train") == 0

    assert value(registry, "loraplex_trainer_phase_seconds_total", phase="sync") == 0  # there from the start
    report = StepReport(
        ["a", "b"], Timings(rollout=1.0, sync=0.25), rollout_tokens=120, train_tokens=300, seconds=1.5,
        metrics={"a": {"step": 1, "reward_mean": 0.25, "logprob_diff_mean": 0.01, "logprob_diff_max": 0.2,
                       "eval_reward": 0.75}},
        # b failed in this step: no step, no reward
    )  # fmt: skip
    metrics.observe_step(report)
    metrics.adapters.set(1)
    metrics.set_memory({"process_resident": 1000, "adapters": 64})

    assert value(registry, "loraplex_trainer_steps_total", experiment="a") == 1
    assert value(registry, "loraplex_trainer_steps_total", experiment="b") == 0
    assert value(registry, "loraplex_trainer_reward", experiment="a") == 0.25
    assert value(registry, "loraplex_trainer_reward", experiment="b") is None
    assert value(registry, "loraplex_trainer_eval_reward", experiment="a") == 0.75
    assert value(registry, "loraplex_trainer_phase_seconds_total", phase="rollout") == 1.0
    assert value(registry, "loraplex_trainer_phase_seconds_total", phase="sync") == 0.25
    assert value(registry, "loraplex_trainer_logprob_diff", experiment="a", stat="mean") == 0.01
    assert value(registry, "loraplex_trainer_logprob_diff", experiment="a", stat="max") == 0.2
    assert value(registry, "loraplex_trainer_tokens_total", phase="rollout") == 120
    assert value(registry, "loraplex_trainer_tokens_total", phase="train") == 300
    assert value(registry, "loraplex_trainer_step_seconds_count") == 1
    assert value(registry, "loraplex_trainer_step_seconds_sum") == 1.5
    assert value(registry, "loraplex_trainer_adapters") == 1
    assert value(registry, "loraplex_trainer_memory_bytes", kind="adapters") == 64


def test_forget_removes_every_series_of_an_experiment() -> None:
    registry = CollectorRegistry()
    metrics = TrainerMetrics(registry)
    metrics.track("a")
    metrics.track("b")
    both = {"a": {"reward_mean": 1.0, "eval_reward": 1.0}, "b": {"reward_mean": 0.5}}
    metrics.observe_step(StepReport(["a", "b"], Timings(), 1, 1, 0.1, metrics=both))
    metrics.forget("a")
    metrics.forget("never-added")  # harmless
    text = generate_latest(registry).decode()
    assert 'experiment="a"' not in text and 'experiment="b"' in text


def test_resident_bytes_is_positive() -> None:
    assert resident_bytes() > 0
