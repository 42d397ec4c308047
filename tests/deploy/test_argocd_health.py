"""The Argo CD health checks, run in a real Lua 5.1 (lupa) the way Argo CD runs them against its test cases.

Argo CD evaluates health.lua with gopher-lua (Lua 5.1) and a global `obj` holding the resource; the
script returns {status, message}. Each kind's health_test.yaml lists inputs and the expected result,
laid out as in Argo CD's own resource_customizations/ so the checks can be contributed upstream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex_api import parse_document

lua51 = pytest.importorskip("lupa.lua51", reason="lupa (a Lua runtime) is in the dev extras")

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "docs" / "argocd"
CUSTOMIZATIONS = ARGOCD / "resource_customizations" / "loraplex.dev"
KINDS = ("LoRAExperiment", "SharedBasePool")
ARGO_HEALTH_STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}
# Argo CD's Lua VM has no io, os (beyond a safe subset), package loading or debug library.
UNAVAILABLE_IN_ARGO = ("io", "os", "package", "require", "dofile", "loadfile", "load", "debug")


def to_lua(lua: Any, value: Any) -> Any:
    """A decoded JSON value as Argo CD hands it to Lua: objects are tables, arrays 1-based tables."""
    if isinstance(value, dict):
        return lua.table_from({k: to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([to_lua(lua, v) for v in value])
    return value


def run_health(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    for name in UNAVAILABLE_IN_ARGO:
        lua.globals()[name] = None
    lua.globals().obj = to_lua(lua, obj)
    result = lua.execute((CUSTOMIZATIONS / kind / "health.lua").read_text())
    return dict(result.items())


def cases() -> list[Any]:
    found = []
    for kind in KINDS:
        spec = yaml.safe_load((CUSTOMIZATIONS / kind / "health_test.yaml").read_text())
        for test in spec["tests"]:
            found.append(pytest.param(kind, test, id=f"{kind}-{Path(test['inputPath']).stem}"))
    return found


@pytest.mark.parametrize(("kind", "test"), cases())
def test_health_matches_the_expected_status(kind: str, test: dict[str, Any]) -> None:
    obj = yaml.safe_load((CUSTOMIZATIONS / kind / test["inputPath"]).read_text())
    # The cases are real resources: spec and status as loraplex_api defines them.
    assert parse_document(obj, test["inputPath"]).kind == kind
    health = run_health(kind, obj)
    assert health == test["healthStatus"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_testdata_file_is_a_case_and_every_status_is_covered(kind: str) -> None:
    spec = yaml.safe_load((CUSTOMIZATIONS / kind / "health_test.yaml").read_text())
    listed = {Path(t["inputPath"]).name for t in spec["tests"]}
    assert listed == {p.name for p in (CUSTOMIZATIONS / kind / "testdata").glob("*.yaml")}
    statuses = {t["healthStatus"]["status"] for t in spec["tests"]}
    assert statuses <= ARGO_HEALTH_STATUSES
    assert statuses == {"Healthy", "Progressing", "Degraded", "Suspended"}


@pytest.mark.parametrize("kind", KINDS)
def test_generation_not_yet_observed_is_progressing_whatever_the_conditions_say(kind: str) -> None:
    obj = {
        "kind": kind,
        "metadata": {"name": "x", "generation": 5},
        "status": {"observedGeneration": 4, "conditions": [{"type": "Failed", "status": "True"}]},
    }
    assert run_health(kind, obj)["status"] == "Progressing"


@pytest.mark.parametrize("kind", KINDS)
def test_argocd_cm_snippet_carries_the_same_scripts(kind: str) -> None:
    configmap = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    key = f"resource.customizations.health.loraplex.dev_{kind}"
    assert configmap["data"][key] == (CUSTOMIZATIONS / kind / "health.lua").read_text(), (
        f"docs/argocd/argocd-cm.yaml {key} differs from {kind}/health.lua: copy the script into it"
    )
