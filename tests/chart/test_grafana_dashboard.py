"""The chart's Grafana dashboard asks only for metrics and labels the operator and the trainer export.

The exported names come from the real metric classes, registered on fresh registries, so a metric
renamed or dropped in the code fails here instead of leaving an empty panel in Grafana.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from loraplex_operator.metrics import OperatorMetrics
from loraplex_trainer.metrics import TrainerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "loraplex" / "dashboards" / "loraplex.json"

# Prometheus adds these to every series it scrapes, whatever the exporter says.
TARGET_LABELS = frozenset({"job", "instance"})
PROMQL_FUNCTIONS = frozenset(
    {
        *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
        *("bottomk", "topk", "quantile", "limitk", "limit_ratio"),
        *("rate", "irate", "increase", "delta", "idelta", "deriv", "predict_linear", "resets", "changes"),
        *("histogram_quantile", "histogram_count", "histogram_sum", "histogram_fraction"),
        *("abs", "ceil", "floor", "round", "sqrt", "exp", "ln", "log2", "log10", "sgn"),
        *("clamp", "clamp_min", "clamp_max", "scalar", "vector", "time", "timestamp", "sort", "sort_desc"),
        *("absent", "absent_over_time", "label_replace", "label_join"),
        *(f"{f}_over_time" for f in ("avg", "min", "max", "sum", "count", "last", "quantile", "stddev")),
    }
)
PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}
)

Labels = dict[str, frozenset[str]]


def exported() -> Labels:
    """Every sample name the operator and the trainer export, with the labels each carries."""
    samples: dict[str, frozenset[str]] = {}
    for cls in (OperatorMetrics, TrainerMetrics):
        registry = CollectorRegistry()
        holder = cls(registry)
        registered = {family.name: family.type for family in registry.collect()}
        for metric in vars(holder).values():
            if not isinstance(metric, MetricWrapperBase):
                continue
            # prometheus_client keeps a metric's label names only on the metric object itself.
            name, labels = metric._name, frozenset(metric._labelnames)
            kind = registered[name]
            if kind == "counter":
                samples[f"{name}_total"] = labels
            elif kind == "histogram":
                samples |= {f"{name}_sum": labels, f"{name}_count": labels}
                samples[f"{name}_bucket"] = labels | {"le"}
            else:
                samples[name] = labels
    return samples


EXPORTED = exported()

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_VARIABLE = re.compile(r"\$\{?[A-Za-z0-9_]+(?::[A-Za-z0-9_]+)?\}?")
_IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def problems(expr: str, reads: Iterable[str] = (), exported: Labels = EXPORTED) -> list[str]:
    """What in one PromQL expression names a metric or label nobody exports.

    ``reads`` are labels taken from the result: a legend's {{label}}, a label_values() label.
    """
    found: list[str] = []
    used: dict[str, set[str]] = {}  # metric -> labels its selectors match on
    anonymous: set[str] = set()  # labels of selectors without a metric name, like {job="x"}

    def selector(match: re.Match[str]) -> str:
        labels = set(_MATCHER.findall(match[2]))
        if match[1]:
            used.setdefault(match[1], set()).update(labels)
            return f" {match[1]} "
        anonymous.update(labels)
        return " "

    rest = _SELECTOR.sub(selector, expr)
    rest = _STRING.sub(" ", rest)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)  # ranges and subqueries: [5m], [$__rate_interval]
    rest = _VARIABLE.sub(" ", rest)
    clauses = [
        (word, {label.strip() for label in labels.split(",")} - {""})
        for word, labels in _GROUPING.findall(rest)
    ]
    grouping = set().union(*(labels for _, labels in clauses))
    kept = set().union(*(labels for word, labels in clauses if word == "by"))
    rest = _GROUPING.sub(" ", rest)
    for name, call in _IDENTIFIER.findall(rest):
        if call:
            if name not in PROMQL_FUNCTIONS:
                found.append(f"{name}(): not a PromQL function")
        elif name not in PROMQL_KEYWORDS:
            used.setdefault(name, set())

    if not used:
        found.append("names no metric")
    known: set[str] = set(TARGET_LABELS)
    for name, labels in sorted(used.items()):
        if name not in exported:
            found.append(f"{name}: not exported by the operator or the trainer")
            continue
        known |= exported[name]
        if unknown := labels - exported[name] - TARGET_LABELS:
            found.append(f"{name}: no label {sorted(unknown)} (it has {sorted(exported[name])})")
    # After `sum by (...)` only those labels are left to read (a rough cut: every `by` counts).
    readable = kept or known
    for what, labels, among in (
        ("grouping", grouping, known),
        ("matcher", anonymous, known),
        ("read", set(reads), readable),
    ):
        if unknown := labels - among:
            found.append(f"{what} label {sorted(unknown)} is not among {sorted(among)} of {sorted(used)}")
    return found


def variable_problems(query: str) -> list[str]:
    """The same check for a template variable's query: label_values(selector, label) or plain PromQL."""
    if match := _LABEL_VALUES.match(query):
        return problems(match[1], reads=[match[2]])
    return problems(query)


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, expr, legend) of every panel query."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield (
                f"panel {panel['title']!r} {target['refId']}",
                target["expr"],
                target.get("legendFormat", ""),
            )


def variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, query) of every query variable (Grafana stores the query as a string or an object)."""
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield f"variable {variable['name']}", query["query"] if isinstance(query, dict) else query


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_every_query_names_exported_metrics_and_labels(dashboard: dict[str, Any]) -> None:
    found = [
        f"{where}: {p}"
        for where, expr, legend in targets(dashboard)
        for p in problems(expr, reads=_LEGEND_LABEL.findall(legend))
    ]
    found += [
        f"{where}: {p}" for where, query in variable_queries(dashboard) for p in variable_problems(query)
    ]
    assert not found, "\n".join(found)


def test_the_dashboard_shows_pools_experiments_step_time_placement_and_promotions(
    dashboard: dict[str, Any],
) -> None:
    exprs = " ".join(expr for _, expr, _ in targets(dashboard))
    for metric in (
        "loraplex_pool_slots",
        "loraplex_experiments",
        "loraplex_placement_wait_seconds_bucket",
        "loraplex_promotions_total",
        "loraplex_trainer_reward",
        "loraplex_trainer_steps_total",
        "loraplex_trainer_step_seconds_bucket",
    ):
        assert metric in EXPORTED and re.search(rf"\b{metric}\b", exprs), metric


def test_panels_query_the_chosen_data_source_and_have_unique_ids(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat"}, panel["title"]
        for source in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert source == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [
        ("rate(loraplex_made_up_total[5m])", "loraplex_made_up_total: not exported"),
        ("loraplex_trainer_steps", "loraplex_trainer_steps: not exported"),  # a counter is read as _total
        ('loraplex_pool_slots{pool="p", replica="r"}', "no label ['replica']"),
        ("sum by (pool) (loraplex_trainer_reward)", "grouping label ['pool']"),
        ("ratee(loraplex_trainer_steps_total[5m])", "ratee(): not a PromQL function"),
        ("vector(1)", "names no metric"),
    ],
)
def test_the_check_catches_what_prometheus_would_answer_with_nothing(expr: str, complaint: str) -> None:
    assert any(complaint in problem for problem in problems(expr)), problems(expr)


def test_the_check_accepts_what_the_code_exports() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le) (rate(loraplex_placement_wait_seconds_bucket[$__rate_interval]))) "
        '/ on () group_left sum(loraplex_pool_slots{namespace=~"$namespace", state="used"} offset 1h)'
    )
    assert problems(expr) == []
    assert problems("loraplex_trainer_memory_bytes", reads=["instance", "kind"]) == []
    assert problems("sum by (phase) (rate(loraplex_trainer_tokens_total[5m]))", reads=["kind"]) != []
    assert variable_problems('label_values(loraplex_pool_slots{namespace=~"$namespace"}, pool)') == []
    assert variable_problems("label_values(loraplex_trainer_steps_total, pool)") != []
