"""Benchmark for `loraplex validate`: 10,000 LoRAExperiments (the quickstart's four, copied) in one folder.

Prints the wall time of load_manifests() with the C (libyaml) loader the code uses and with
PyYAML's pure-Python SafeLoader, measured side by side in one run, and the ratio. Target: under
5 s for 10,000 experiments on a 2-core machine. Usage: ``python bench/bench_validate.py [--experiments N]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

try:
    import loraplex_api  # noqa: F401
except ImportError:  # running from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "api"))

import yaml

from loraplex_api import load_manifests, yaml_documents

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart"


def write_world(folder: Path, experiments: int, per_file: int) -> None:
    """The quickstart pool and ``experiments`` renamed copies of its experiments, ``per_file`` to a file."""
    pool = (QUICKSTART / "pool.yaml").read_text()
    originals = [d for d in yaml.safe_load_all((QUICKSTART / "experiments.yaml").read_text()) if d]
    (folder / "pool.yaml").write_text(pool)
    docs = []
    for i in range(experiments):
        doc = yaml.safe_load(yaml.safe_dump(originals[i % len(originals)]))
        doc["metadata"]["name"] = f"exp-{i:05d}"
        docs.append(doc)
    for start in range(0, experiments, per_file):
        (folder / f"experiments-{start:05d}.yaml").write_text(
            yaml.safe_dump_all(docs[start : start + per_file])
        )


def timed(folder: Path, loader: type[yaml.SafeLoader]) -> tuple[float, int]:
    yaml_documents.Loader = loader
    started = time.perf_counter()
    manifests = load_manifests([folder])
    return time.perf_counter() - started, len(manifests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=10_000)
    parser.add_argument("--per-file", type=int, default=1_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        write_world(folder, args.experiments, args.per_file)
        c_loader = getattr(yaml, "CSafeLoader", None)
        if c_loader is None:
            print("PyYAML has no libyaml here: only the pure-Python loader can be measured")
        fast, count = timed(folder, c_loader or yaml.SafeLoader)
        slow, _ = timed(folder, yaml.SafeLoader)
    print(
        f"{count} manifests ({args.experiments} experiments + 1 pool) in {args.experiments // args.per_file} files"
    )
    print(f"load_manifests, C loader:       {fast:6.2f} s  ({args.experiments / fast:,.0f} experiments/s)")
    print(f"load_manifests, Python loader:  {slow:6.2f} s")
    print(f"ratio python/C: {slow / fast:.1f}x")
    print(f"target < 5 s: {'met' if fast < 5 else 'MISSED'}")


if __name__ == "__main__":
    main()
