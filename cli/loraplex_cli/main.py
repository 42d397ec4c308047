"""The `loraplex` command: it parses arguments and hands each subcommand to the package that does it.

This package sits above the three others and nothing imports it: `crds` and `validate` run in
loraplex_api, `operator` in loraplex_operator, `train` and `agent` in loraplex_trainer. Each is
imported only when its subcommand runs, so the operator image works without torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from loraplex_api.wire import (
    HEALTH_PORT,
    METRICS_PORT,
    POD_NAME_ENV,
    POD_NAMESPACE_ENV,
    POOL_ENV,
    STORAGE_MOUNT,
)


def _crds(args: argparse.Namespace) -> int:
    from loraplex_api.crdgen import write_crds

    for path in write_crds(Path(args.output)):
        print(f"wrote {path}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from loraplex_api import ManifestError, load_manifests

    try:
        manifests = load_manifests(args.files)
    except ManifestError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    for m in manifests:
        print(f"{m.resource.kind}/{m.resource.metadata.name}: valid")
    return 0


def _train(args: argparse.Namespace) -> int:
    from loraplex_trainer.standalone import train

    return train(args)


def _operator(args: argparse.Namespace) -> int:
    from loraplex_operator.main import run

    return run(args)


def _agent(args: argparse.Namespace) -> int:
    from loraplex_trainer.agent import run

    return run(args)


def _report(args: argparse.Namespace) -> int:
    from loraplex_trainer.compare import report_command

    return report_command(args)


def _serve(args: argparse.Namespace) -> int:
    from loraplex_trainer.serving import run_local

    return run_local(args)


def _serving(args: argparse.Namespace) -> int:
    from loraplex_trainer.serving import run_pod

    return run_pod(args)


def _serving_arguments(parser: argparse.ArgumentParser, *, host: str) -> None:
    parser.add_argument("--host", default=host, help=f"address to answer on (default: {host})")
    parser.add_argument(
        "--port", type=int, default=8000, help="port of the OpenAI-compatible API (default: 8000)"
    )
    parser.add_argument(
        "--max-lora-rank", type=int, default=64, help="the largest adapter rank (default: 64)"
    )
    parser.add_argument("--dtype", default="auto", help="vLLM's --dtype (default: auto)")
    parser.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="seconds between reads of the promoted adapters (default: 2)",
    )
    parser.set_defaults(vllm_args=[])  # what follows `--` on the command line: more `vllm serve` arguments


_PLOTS_HELP = (
    "rewards: RUN_DIR/rewards.png, every experiment on one chart (default); all: also "
    "RUN_DIR/metrics.png, reward, KL, completion length and grad norm per experiment"
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="loraplex", description=(__doc__ or "").split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="write the CustomResourceDefinitions generated from loraplex_api")
    crds.add_argument("--output", "-o", default="crds", help="folder to write into (default: crds)")
    crds.set_defaults(func=_crds)

    validate = sub.add_parser("validate", help="validate SharedBasePool/LoRAExperiment manifests")
    validate.add_argument("files", nargs="+", help="YAML files or folders (one or many documents each)")
    validate.set_defaults(func=_validate)

    train = sub.add_parser("train", help="run a pool and its experiments locally, without Kubernetes")
    train.add_argument("files", nargs="+", help="YAML files: one SharedBasePool and its LoRAExperiments")
    train.add_argument("--output", "-o", required=True, help="run folder; running again with it resumes")
    train.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    train.add_argument("--no-live", action="store_true", help="plain log lines instead of the live display")
    train.add_argument(
        "--max-steps", type=int, default=None, help="cap every experiment's maxSteps (smoke runs)"
    )
    train.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: one per core; use 1 on a machine busy with other work)",
    )
    train.add_argument(
        "--report-to",
        nargs="+",
        default=["none"],
        choices=["tensorboard", "mlflow", "none"],
        help="also log per-experiment scalars to TensorBoard (RUN_DIR/tensorboard) and/or MLflow "
        "($MLFLOW_TRACKING_URI, else RUN_DIR/mlruns)",
    )
    train.add_argument("--plots", default="rewards", choices=["rewards", "all", "none"], help=_PLOTS_HELP)
    train.set_defaults(func=_train)

    report = sub.add_parser("report", help="compare a run's experiments: charts and a table, from its files")
    report.add_argument("run_dir", help="a `loraplex train --output` folder (finished or running)")
    report.add_argument("--plots", default="rewards", choices=["rewards", "all", "none"], help=_PLOTS_HELP)
    report.set_defaults(func=_report)

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    op.add_argument(
        "--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)"
    )
    op.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    op.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port (0 = off)")
    op.add_argument("--peering", default=None, help="kopf peering name for high availability")
    op.add_argument("--standalone", action="store_true", help="no peering (one replica, Recreate strategy)")
    op.add_argument("--verbose", "-v", action="store_true")
    op.set_defaults(func=_operator)

    agent = sub.add_parser("agent", help="run a trainer replica inside a SharedBasePool's pod")
    agent.add_argument("--pool", default=None, help=f"pool name (default: ${POOL_ENV})")
    agent.add_argument("--namespace", default=None, help=f"namespace (default: ${POD_NAMESPACE_ENV})")
    agent.add_argument("--replica", default=None, help=f"this replica's name (default: ${POD_NAME_ENV})")
    agent.add_argument("--storage", default=STORAGE_MOUNT, help="shared storage mount")
    agent.add_argument("--health-port", type=int, default=HEALTH_PORT)
    agent.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    agent.set_defaults(func=_agent)

    serve = sub.add_parser(
        "serve",
        help="serve a run's base model and adapters over an OpenAI-compatible API (vLLM); after --: vllm serve arguments",
    )
    serve.add_argument("run_dir", help="a `loraplex train --output` folder")
    _serving_arguments(serve, host="127.0.0.1")
    serve.set_defaults(func=_serve)

    serving = sub.add_parser("serving", help="run a SharedBasePool's serving replica (in its pod)")
    serving.add_argument("--model-uri", required=True, help="the base model (file:// inside the pod)")
    serving.add_argument("--model-name", required=True, help="the pool's spec.model.name, served as the base")
    serving.add_argument("--namespace", default=None, help="namespace of the promoted-adapters ConfigMap")
    serving.add_argument("--configmap", default=None, help="the pool's promoted-adapters ConfigMap")
    serving.add_argument("--promoted-dir", default=None, help="or: that ConfigMap mounted as a folder")
    serving.add_argument(
        "--allow-file-uris", action="store_true", help="also serve file:// checkpoints (outside a cluster)"
    )
    serving.add_argument("--claim", action="append", default=[], help="NAME=/mount: where a claim is mounted")
    serving.add_argument("--max-loras", type=int, default=8, help="adapters batched at once (default: 8)")
    _serving_arguments(serving, host="0.0.0.0")
    serving.set_defaults(func=_serving)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the chosen subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on: list[str] = []
    if argv and argv[0] in ("serve", "serving") and "--" in argv:  # the rest is vLLM's
        cut = argv.index("--")
        argv, passed_on = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    if passed_on:
        args.vllm_args = passed_on
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
