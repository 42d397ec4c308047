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
    best = max(EXPERIMENTS, key=lambda n: summary[n]["eval_reward"])
    assert drawn["best"] == {
        "experiment": best,
        "metric": "eval_reward",
        "value": summary[best]["eval_reward"],
    }
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

    assert sorted(p.name for p in (run / "tensorboard").iterdir()) == sorted(EXPERIMENTS)
    for name in EXPERIMENTS:
        events = EventAccumulator(str(run / "tensorboard" / name))
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

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
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
