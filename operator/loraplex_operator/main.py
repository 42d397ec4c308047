"""``loraplex operator``: run the kopf operator for SharedBasePools and LoRAExperiments.

Credentials come from the pod's service account in a cluster, else from
KUBECONFIG (``kopf.login_via_client``). ``--namespace`` (repeatable) limits the
watch to those namespaces; without it the operator watches the whole cluster.
High availability: ``--peering NAME`` runs several replicas of which kopf
peering keeps one active; ``--standalone`` (the default) expects exactly one
replica, deployed with the Recreate strategy. See docs/operator.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import threading
from collections.abc import Sequence

import kopf
from prometheus_client import REGISTRY, start_http_server

from loraplex_api.wire import GROUP, POOL_LABEL

from . import handlers  # noqa: F401  (registers the handlers with kopf's default registry)
from .kube import KubeClient
from .metrics import OperatorMetrics
from .runtime import OperatorConfig, Runtime

logger = logging.getLogger(__name__)

ANNOTATION_PREFIX = GROUP
FINALIZER = f"{ANNOTATION_PREFIX}/finalizer"


def build_settings(
    *, peering: str | None = None, standalone: bool = True, clusterwide: bool = False
) -> kopf.OperatorSettings:
    """kopf settings: our annotation prefix for progress and diff-base, our finalizer, the peering mode."""
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    # Our Events are posted explicitly; kopf's own log lines become Events only when they are warnings.
    settings.posting.level = logging.WARNING
    # Restart long watches now and then: a silently dropped connection must not stall the operator.
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # Only the pools' trainer pods matter; let the API server filter them (kopf >= 1.45; kopf also
    # filters in memory, so older versions and servers that ignore selectors still work).
    selectors = getattr(settings.watching, "label_selectors", None)
    if selectors is not None:
        selectors["", "v1", "pods"] = POOL_LABEL
    settings.peering.standalone = standalone
    settings.peering.mandatory = not standalone
    settings.peering.clusterwide = clusterwide
    if peering:
        settings.peering.name = peering
        # kopf freezes every peer that sees another one of equal priority, so replicas of one
        # Deployment (identical flags) would all stand still; a random priority elects one.
        settings.peering.priority = secrets.randbelow(2**31 - 1) + 1
    return settings


def build_runtime(config: OperatorConfig | None = None, metrics: OperatorMetrics | None = None) -> Runtime:
    """The state every handler shares (kopf ``memo``)."""
    return Runtime(
        config=config or OperatorConfig.from_env(),
        api=KubeClient(),
        metrics=metrics or OperatorMetrics(REGISTRY),
    )


async def operate(
    runtime: Runtime,
    settings: kopf.OperatorSettings,
    *,
    namespaces: Sequence[str] = (),
    liveness: str | None = None,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
) -> None:
    """Run the operator in the current event loop until it stops (tests run this in a thread)."""
    await kopf.operator(
        registry=kopf.get_default_registry(),
        settings=settings,
        memo=kopf.Memo(runtime=runtime),
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        standalone=settings.peering.standalone,
        # kopf makes peering mandatory whenever a peering name is passed.
        peering_name=None if settings.peering.standalone else settings.peering.name,
        liveness_endpoint=liveness,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )


def run(args: argparse.Namespace) -> int:
    """Entry point of ``loraplex operator`` (arguments from loraplex_cli.main)."""
    namespaces: list[str] = list(args.namespace or [])
    if namespaces and args.all_namespaces:
        logger.error("--namespace and --all-namespaces exclude each other")
        return 2
    if args.peering and args.standalone:
        logger.error("--peering and --standalone exclude each other")
        return 2
    try:
        config = OperatorConfig.from_env()
    except ValueError as error:
        logger.error("bad configuration: %s", error)
        return 2
    kopf.configure(debug=args.verbose, verbose=args.verbose, log_format=kopf.LogFormat.FULL)
    if args.metrics_port:
        start_http_server(args.metrics_port)
    settings = build_settings(peering=args.peering, standalone=not args.peering, clusterwide=not namespaces)
    logger.info(
        "starting operator namespaces=%s peering=%s metrics_port=%s",
        ",".join(namespaces) or "*",
        args.peering or "standalone",
        args.metrics_port or "off",
    )
    asyncio.run(operate(build_runtime(config), settings, namespaces=namespaces, liveness=args.liveness))
    return 0
