"""Comparing a run's experiments: the chart, the table, `loraplex report`, TensorBoard and MLflow.

One real tiny `loraplex train` run for the module (two experiments, three steps), with every
output switched on; each test reads what it wrote through the tool a user would use.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.image
import pytest

from loraplex_cli.main import main
from loraplex_trainer.compare import ExperimentRecord, best, read_run
from loraplex_trainer.tracking import Trackers, build_trackers
from tests.trainer.test_standalone import manifests

EXPERIMENTS = ("short", "digits")


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("compare")
    out = folder / "out"
    code = main(
        ["train", str(manifests(folder, tiny_model_dir)), "--output", str(out), "--no-live",
         "--report-to", "tensorboard", "mlflow", "--plots", "all"]
    )  # fmt: skip
    assert code == 0
    return out


def test_the_comparison_chart_draws_every_experiment_legend_sorted_by_final_eval(run: Path) -> None:
    image = matplotlib.image.imread(run / "rewards.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    drawn = json.loads((run / "rewards.json").read_text())
    assert sorted(drawn["legend"]) == sorted(EXPERIMENTS)
    summary = json.loads((run / "summary.json").read_text())["experiments"]
    evals = [summary[name]["eval_reward"] for name in drawn["legend"]]
    assert evals == sorted(evals, reverse=True)
    assert [s["steps"] for s in drawn["series"]] == [3, 3]
    top = drawn["legend"][0]  # the legend's first is the best, ties by name in both
    assert summary[top]["eval_reward"] == max(summary[n]["eval_reward"] for n in EXPERIMENTS)
    assert drawn["best"] == {"experiment": top, "metric": "eval_reward", "value": summary[top]["eval_reward"]}
    assert matplotlib.image.imread(run / "metrics.png").shape[0] > 100  # --plots all


def test_loraplex_report_redraws_and_names_the_best_from_the_files_alone(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (run / "rewards.png").unlink()
    assert main(["report", str(run)]) == 0
    printed = capsys.readouterr().out
    best = json.loads((run / "rewards.json").read_text())["best"]["experiment"]
    assert f"best by eval_reward: {best}" in printed and all(name in printed for name in EXPERIMENTS)
    assert (run / "rewards.png").is_file()
    assert main(["report", str(run.parent / "nowhere")]) == 1
    assert capsys.readouterr().err.strip().endswith("no such folder")


def test_tensorboard_has_one_run_per_experiment_with_its_scalars_at_its_steps(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert sorted(p.name for p in (run / "tracking" / "tensorboard").iterdir()) == sorted(EXPERIMENTS)
    for name in EXPERIMENTS:
        events = EventAccumulator(str(run / "tracking" / "tensorboard" / name))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"reward/mean", "reward/std", "train/loss", "train/kl", "train/completion_length",
                "train/grad_norm", "perf/tokens_per_second", "perf/step_seconds", "reward/eval"} <= tags  # fmt: skip
        assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3]
        rows = [json.loads(x) for x in (run / name / "metrics.jsonl").read_text().splitlines()]
        assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx(
            [r["reward_mean"] for r in rows]
        )
        assert [e.step for e in events.Scalars("reward/eval")] == [3]  # eval only at the end here
        assert "hyperparameters/text_summary" in events.Tags()["tensors"]  # the sweep's knobs, as text


def test_mlflow_has_one_run_per_experiment_with_metrics_per_step(run: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "tracking" / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny")  # the pool's name
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == sorted(EXPERIMENTS)
    for found in runs:
        history = client.get_metric_history(found.info.run_id, "reward/mean")
        assert sorted(m.step for m in history) == [1, 2, 3]
        assert found.info.status == "FINISHED"
        rank = {"short": "2", "digits": "4"}[found.info.run_name]
        assert (
            found.data.params["lora.rank"] == rank and found.data.params["optimizer.learningRate"] == "0.01"
        )


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_extra(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were absent
    file = manifests(tmp_path, tiny_model_dir)
    assert (
        main(["train", str(file), "--output", str(tmp_path / "o"), "--no-live", "--report-to", "tensorboard"])
        == 1
    )
    err = capsys.readouterr().err.strip()
    assert err == (
        "--report-to tensorboard: the tensorboard package is not installed; pip install 'loraplex[tensorboard]'"
    )


def _record(name: str, metric: str, value: float | None, rows: int = 3) -> ExperimentRecord:
    summary = {"promotion_metric": metric, "eval_reward": value if metric == "eval_reward" else None}
    body = [{"step": i + 1, "reward_mean": 0.1 * i} for i in range(rows)]
    if metric not in ("eval_reward", "reward") and value is not None:
        body[-1][metric] = value
    return ExperimentRecord(name, body, summary)


def test_the_best_is_ranked_within_one_metric_and_never_a_nan() -> None:
    records = [
        _record("a", "eval_reward", 0.9),
        _record("b", "eval_reward", float("nan")),
        _record("c", "eval_reward", -0.5),
        _record("d", "accuracy", 5.0),  # another metric: not comparable with the others
    ]
    top = best(records)
    assert top is not None and top.name == "a"
    assert best([_record("n", "eval_reward", None)]) is None
    assert best([_record("z", "eval_reward", 1.0), _record("b", "eval_reward", 1.0)]).name == "b"  # type: ignore[union-attr]
    assert best([_record("x", "eval_reward", -2.0), _record("y", "eval_reward", -1.0)]).name == "y"  # type: ignore[union-attr]


def test_a_report_skips_rows_that_are_not_loraplex_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "metrics.jsonl").write_text(
        '{"step": 1, "reward_mean": 0.5}\n[1, 2]\n{"step": 2}\n{"step": 3, "rew'
    )
    assert main(["report", str(tmp_path)]) == 0
    assert [r["step"] for r in read_run(tmp_path)[0].rows] == [1]


def test_a_resumed_run_continues_its_tracker_runs_without_doubling_steps(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trackers = build_trackers(["tensorboard", "mlflow"], tmp_path, "pool")
    rows = [{"step": s, "reward_mean": s / 10, "tokens": 10, "seconds": 1.0} for s in range(1, 6)]
    trackers.start("exp", "run-1/exp", 0, {"lora.rank": "4"})
    for row in rows:  # steps 1-5, then the process dies; the checkpoint was at step 3
        trackers.log("exp", row["step"], row)
    trackers.close()
    again = build_trackers(["tensorboard", "mlflow"], tmp_path, "pool")
    again.start("exp", "run-1/exp", 3, {"lora.rank": "4"})
    for row in [{"step": s, "reward_mean": s, "tokens": 10, "seconds": 1.0} for s in range(4, 7)]:
        again.log("exp", row["step"], row)
    again.finish("exp", "Completed")
    again.close()

    events = EventAccumulator(str(tmp_path / "tensorboard" / "exp"))
    events.Reload()
    scalars = events.Scalars("reward/mean")
    assert [e.step for e in scalars] == [1, 2, 3, 4, 5, 6]  # the lost steps 4-5 purged, not doubled
    assert [e.value for e in scalars] == pytest.approx([0.1, 0.2, 0.3, 4.0, 5.0, 6.0])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    [found] = client.search_runs([client.get_experiment_by_name("pool").experiment_id])
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id, "reward/mean")) == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    assert found.info.status == "FINISHED" and found.data.params == {"lora.rank": "4"}
    # Another run folder is another MLflow run, even for the same experiment name.
    other = build_trackers(["mlflow"], tmp_path, "pool")
    other.start("exp", "run-2/exp", 0, {})
    other.close()
    assert len(client.search_runs([found.info.experiment_id])) == 2


def test_a_tracker_that_fails_is_set_aside_and_training_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        calls = 0

        def start(self, *args: object) -> None:
            pass

        def log(self, *args: object) -> None:
            Broken.calls += 1
            raise ConnectionError("tracking server away")

        def finish(self, *args: object) -> None:
            pass

        def close(self) -> None:
            raise ConnectionError("still away")

    trackers = Trackers([Broken()])
    for step in (1, 2, 3):
        trackers.log("exp", step, {"reward_mean": 1.0})
    trackers.close()
    assert Broken.calls == 1  # one timeout, not one per step
    assert "tracking_failed tracker=Broken" in caplog.text
