"""`loraplex validate` and `loraplex crds` as a user runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraplex_cli.main import main
from tests.api.test_models import EXPERIMENT, POOL, with_spec


def write(path: Path, *docs: dict) -> Path:
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_validate_accepts_good_multi_document_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {}}
    file = write(tmp_path / "ok.yaml", POOL, configmap, EXPERIMENT)
    assert main(["validate", str(file)]) == 0
    out = capsys.readouterr().out
    assert "SharedBasePool/smollm2: valid" in out and "LoRAExperiment/arith: valid" in out


def test_validate_reports_every_problem_one_line_each(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad_pool = with_spec(POOL, "replicas", -1)
    bad_exp = with_spec(with_spec(EXPERIMENT, "lora.rank", 0), "optimizer.learningRate", "fast")
    write(tmp_path / "a.yaml", bad_pool)
    write(tmp_path / "b.yaml", bad_exp)
    (tmp_path / "c.yaml").write_text("kind: [unclosed\n")
    assert (
        main(["validate", str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml"), str(tmp_path / "c.yaml")]) == 1
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith(
        "SharedBasePool/smollm2: spec.replicas: Input should be greater than or equal to 0"
    )
    assert lines[1].startswith(
        "LoRAExperiment/arith: spec.lora.rank: Input should be greater than or equal to 1"
    )
    assert lines[2].startswith(
        "LoRAExperiment/arith: spec.optimizer.learningRate: Input should be a valid number"
    )
    assert lines[3].startswith(f"File/{tmp_path / 'c.yaml'}: invalid YAML")
    assert len(lines) == 4


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_crds_command_writes_both(tmp_path: Path) -> None:
    assert main(["crds", "--output", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["loraexperiments.yaml", "sharedbasepools.yaml"]
    crd = yaml.safe_load((tmp_path / "loraexperiments.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == "LoRAExperiment"
