"""The agent's API access without a server: ConfigMap reads and the ordered, heartbeating status writer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from loraplex_trainer.cluster import ClusterClient, StatusWriter


class ConfigMaps(ClusterClient):
    """A ClusterClient whose ConfigMaps come from a dict (a name mapped to None answers 500)."""

    def __init__(self, config_maps: Mapping[str, dict[str, str] | None]) -> None:
        super().__init__("ns", client.ApiClient(client.Configuration()))
        self.config_maps = config_maps
        self.reads: list[str] = []

    def read_config_map(self, name: str) -> dict[str, str] | None:
        self.reads.append(name)
        if name in self.config_maps and self.config_maps[name] is None:
            raise ApiException(status=500, reason="etcd is down")
        return self.config_maps.get(name)


def test_config_map_keys_are_read_once_per_config_map_and_missing_ones_named() -> None:
    cluster = ConfigMaps({"rows": {"train.jsonl": "{}", "eval.jsonl": "{}"}, "broken": None})
    refs = [
        ("rows", "train.jsonl", "spec.dataset.configMap"),
        ("rows", "eval.jsonl", "spec.dataset.eval.configMap"),
        ("rows", "other", "spec.reward.python.configMap"),
        ("absent", "x", "spec.reward.terms[0].python.configMap"),
        ("broken", "x", "spec.reward.terms[1].python.configMap"),
    ]
    texts, missing = cluster.read_config_map_keys(refs)
    assert texts == {("rows", "train.jsonl"): "{}", ("rows", "eval.jsonl"): "{}"}
    assert missing[:2] == [
        "spec.reward.python.configMap: ConfigMap rows has no key 'other'",
        "spec.reward.terms[0].python.configMap: ConfigMap absent does not exist",
    ]
    assert missing[2].startswith("spec.reward.terms[1].python.configMap: ConfigMap broken could not be read")
    assert cluster.reads == ["rows", "absent", "broken"]
    cluster.close()


class FakeCluster:
    """Records experiment status patches; names in ``gone`` answer 404."""

    def __init__(self) -> None:
        self.patches: list[tuple[str, Any]] = []
        self.gone: set[str] = set()

    def patch_experiment_status(self, name: str, body: Mapping[str, Any]) -> bool:
        self.patches.append((name, body))
        return name not in self.gone


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def running(state: str = "Running") -> dict[str, Any]:
    return {"status": {"training": {"state": state, "step": 1}}}


def test_heartbeats_refresh_live_experiments_only_and_stop_when_forgotten() -> None:
    cluster, clock = FakeCluster(), Clock()
    writer = StatusWriter(cluster, heartbeat_seconds=30, clock=clock)
    writer.write("a", running())
    writer.write("b", running("Loading"))
    writer.write("done", running("Completed"))
    cluster.patches.clear()

    clock.now = 10
    writer.beat()
    assert cluster.patches == []  # reported 10 s ago: nothing to refresh

    clock.now = 31
    writer.beat()
    assert sorted(name for name, _ in cluster.patches) == ["a", "b"]  # never the finished one
    assert set(cluster.patches[0][1]["status"]["training"]) == {"lastHeartbeatTime"}

    cluster.patches.clear()
    writer.forget("a")  # placed elsewhere now: another replica reports it
    cluster.gone.add("b")  # deleted: the 404 ends its heartbeats too
    clock.now = 62
    writer.beat()
    clock.now = 93
    writer.beat()
    assert [name for name, _ in cluster.patches] == ["b"]


def test_a_fresh_report_postpones_the_heartbeat() -> None:
    cluster, clock = FakeCluster(), Clock()
    writer = StatusWriter(cluster, heartbeat_seconds=30, clock=clock)
    writer.write("a", running())
    clock.now = 25
    writer.write("a", running())
    clock.now = 40
    writer.beat()
    assert len(cluster.patches) == 2  # the report at 25 s is 15 s old: no heartbeat yet
