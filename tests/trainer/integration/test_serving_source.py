"""The serving process's in-cluster source: the promoted-adapters ConfigMap read through the API (KMock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraplex_trainer.serving import ConfigMapSource, local_path, revision_of
from tests.operator.integration.conftest import NAMESPACE, Cluster


def test_the_configmap_source_reads_each_change_through_the_api(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    source = ConfigMapSource(NAMESPACE, "smol-promoted-adapters")
    assert source.read() == {}  # no ConfigMap yet: nothing is promoted
    uri = "pvc://shared/team-a/exp-a/uid-1/checkpoints/step-00000020"
    cluster.api.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "smol-promoted-adapters"},
                        "data": {"exp-a": uri}})  # fmt: skip
    assert source.read() == {"exp-a": uri}
    cluster.api.patch("ConfigMap", "smol-promoted-adapters", {"data": {"exp-a": uri.replace("20", "10")}})
    assert source.read()["exp-a"].endswith("step-00000010")  # a rollback is seen at the next read
    assert revision_of(uri) == "step-00000020"


def test_checkpoint_uris_resolve_inside_their_mounted_claim_only(tmp_path: Path) -> None:
    claims = {"shared": tmp_path / "claims" / "shared"}
    inside = local_path("pvc://shared/team-a/exp-a/checkpoints/step-1", claims)
    assert inside == (tmp_path / "claims" / "shared" / "team-a/exp-a/checkpoints/step-1").resolve()
    with pytest.raises(ValueError, match="claim 'other' is not mounted"):
        local_path("pvc://other/x", claims)
    with pytest.raises(ValueError, match="the path leaves the claim"):
        local_path("pvc://shared/../../etc", claims)
    with pytest.raises(ValueError, match="only pvc:// and file://"):
        local_path("s3://bucket/x", claims)
    with pytest.raises(ValueError, match="a serving pod serves pvc:// checkpoints only"):
        local_path("file:///etc", claims, allow_files=False)
    with pytest.raises(ValueError, match="not an absolute path"):
        local_path("file://org/repo", claims)  # vLLM would fetch it from the Hugging Face hub
    own = "pvc://shared/sub/team-a/exp-a/uid-1/checkpoints/step-00000020"
    assert local_path(own, claims, experiment="exp-a", namespace="team-a").name == "step-00000020"
    for other in (own.replace("exp-a", "exp-b"), own.replace("team-a", "team-b"), own + "/../step-00000010x"):
        with pytest.raises(ValueError, match="not a checkpoint of experiment team-a/exp-a"):
            local_path(other, claims, experiment="exp-a", namespace="team-a")
