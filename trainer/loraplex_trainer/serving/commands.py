"""`loraplex serving` (a pool's serving pod) and `loraplex serve RUN_DIR` (a laptop)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loraplex_api.wire import SERVING_API_KEY_ENV

from .errors import ServingError
from .proxy import serve
from .router import Router
from .sources import ConfigMapFolderSource, ConfigMapSource, PromotedSource, RunDirSource
from .vllm_server import VLLMServer

log = logging.getLogger(__name__)


def _claims(values: Sequence[str]) -> dict[str, Path]:
    claims = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ServingError(f"--claim {value!r}: expected NAME=/mounted/path")
        claims[name] = Path(path)
    return claims


def run_pod(args: Any) -> int:
    """``loraplex serving``: the serving pod's process (rendered by the operator)."""
    from ..model_host import model_folder

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        if args.promoted_dir:
            source: PromotedSource = ConfigMapFolderSource(Path(args.promoted_dir))
        elif args.configmap and args.namespace:
            source = ConfigMapSource(args.namespace, args.configmap)
        else:
            raise ServingError("--configmap with --namespace, or --promoted-dir, names the promoted adapters")
        folder = model_folder(args.model_uri)
        server = VLLMServer(
            folder, args.model_name, args.max_loras, args.max_lora_rank, args.dtype, tuple(args.vllm_args)
        )
        router = Router(
            args.model_name, server.url, source, _claims(args.claim),
            namespace=args.namespace, allow_files=args.allow_file_uris, verify_manifest=True,
        )  # fmt: skip
        api_key = os.environ.get(SERVING_API_KEY_ENV) or None
        asyncio.run(
            serve(server, router, host=args.host, port=args.port, interval=args.interval, api_key=api_key)
        )
    except (ServingError, ValueError) as exc:
        print(f"loraplex serving: {exc}", file=sys.stderr)
        return 1
    return 0


def run_local(args: Any) -> int:
    """``loraplex serve RUN_DIR``: the run's base model and each experiment's final adapter."""
    from ..model_host import model_folder

    logging.basicConfig(level=logging.WARNING)
    run_dir = Path(args.run_dir)
    summary_file = run_dir / "summary.json"
    try:
        if not summary_file.is_file():
            raise ServingError(f"{summary_file}: not found; RUN_DIR is a `loraplex train --output` folder")
        summary = json.loads(summary_file.read_text())
        model = summary.get("model") or {}
        if not model.get("uri"):
            raise ServingError(f"{summary_file}: names no model (written by an older loraplex)")
        source = RunDirSource(run_dir)
        adapters = source.read()
        if not adapters:
            raise ServingError(f"{run_dir}: no experiment has an adapter or a checkpoint yet")
        folder = model_folder(model["uri"])
        name = model.get("name") or model["uri"]
        max_loras = len(adapters)
        server = VLLMServer(folder, name, max_loras, args.max_lora_rank, args.dtype, tuple(args.vllm_args))
        router = Router(name, server.url, source, allow_files=True, verify_manifest=False)
        asyncio.run(serve(server, router, host=args.host, port=args.port, interval=args.interval))
    except (ServingError, ValueError, OSError) as exc:
        print(f"loraplex serve: {exc}", file=sys.stderr)
        return 1
    return 0
