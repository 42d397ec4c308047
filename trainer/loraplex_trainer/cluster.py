"""The trainer replica's access to the Kubernetes API: a few reads and merge patches, nothing else.

:class:`ClusterClient` wraps the official (synchronous) ``kubernetes`` client with the calls
the agent makes. :class:`StatusWriter` sends every experiment status patch, one at a time,
and keeps the heartbeat of training experiments fresh while the agent is busy in a long
step or in loading the base model, so the operator never mistakes a slow step for a lost
replica.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from loraplex_api import now_rfc3339
from loraplex_api.wire import EXPERIMENT_PLURAL, GROUP, POOL_PLURAL, REPLICA_LABEL, VERSION

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = 30.0
"""Seconds before an API request is abandoned; the agent retries at its next poll."""
API_ERRORS = (ApiException, urllib3.exceptions.HTTPError, OSError)
"""What a request to the API server may raise; callers log it and try again later."""


def load_configuration() -> client.Configuration:
    """In-cluster credentials (the pod's service account), else KUBECONFIG or ~/.kube/config."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        log.info("event=kube_config source=in-cluster")
    except ConfigException:
        # The kubernetes package reads $KUBECONFIG once at import; read it now instead.
        path = os.environ.get("KUBECONFIG") or None
        config.load_kube_config(config_file=path, client_configuration=configuration, persist_config=False)
        log.info("event=kube_config source=kubeconfig path=%s", path or "~/.kube/config")
    return configuration


class ClusterClient:
    """The reads and merge patches of one trainer replica, in its namespace."""

    def __init__(self, namespace: str, api_client: client.ApiClient | None = None) -> None:
        self.namespace = namespace
        self._api = api_client or client.ApiClient(load_configuration())
        self._custom = client.CustomObjectsApi(self._api)
        self._core = client.CoreV1Api(self._api)

    def close(self) -> None:
        """Release the connection pool."""
        self._api.close()

    def get_pool(self, name: str) -> dict[str, Any] | None:
        """The raw SharedBasePool, or None when there is no such pool."""
        try:
            pool = self._custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, POOL_PLURAL, name, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return _as_dict(pool)

    def list_experiments(self, replica: str) -> list[dict[str, Any]]:
        """LoRAExperiments labelled for ``replica`` (callers still check; not every server filters)."""
        listing = self._custom.list_namespaced_custom_object(
            GROUP,
            VERSION,
            self.namespace,
            EXPERIMENT_PLURAL,
            label_selector=f"{REPLICA_LABEL}={replica}",
            _request_timeout=REQUEST_TIMEOUT,
        )
        return list(_as_dict(listing).get("items") or [])

    def read_config_map(self, name: str) -> dict[str, str] | None:
        """A ConfigMap's text data, or None when it does not exist."""
        try:
            cm = self._core.read_namespaced_config_map(name, self.namespace, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict(cm.data or {})

    def read_config_map_keys(
        self, refs: Iterable[tuple[str, str, str]]
    ) -> tuple[dict[tuple[str, str], str], list[str]]:
        """The text of each (ConfigMap, key, spec field) and what is missing, each missing one named.

        Missing is not an error here: a ConfigMap may be applied after the experiment that reads it.
        """
        texts: dict[tuple[str, str], str] = {}
        missing: list[str] = []
        read: dict[str, dict[str, str] | None] = {}
        for name, key, where in refs:
            if name not in read:
                try:
                    read[name] = self.read_config_map(name)
                except API_ERRORS as exc:
                    missing.append(f"{where}: ConfigMap {name} could not be read ({exc})")
                    continue
            data = read[name]
            if data is None:
                missing.append(f"{where}: ConfigMap {name} does not exist")
            elif key not in data:
                missing.append(f"{where}: ConfigMap {name} has no key {key!r}")
            else:
                texts[(name, key)] = data[key]
        return texts, missing

    def patch_pool_status(self, name: str, body: Mapping[str, Any]) -> None:
        """Merge-patch a pool's status subresource."""
        self._custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, POOL_PLURAL, name, dict(body),
            _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT,
        )  # fmt: skip

    def patch_experiment_status(self, name: str, body: Mapping[str, Any]) -> bool:
        """Merge-patch an experiment's status subresource; False when the experiment is gone."""
        try:
            self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, EXPERIMENT_PLURAL, name, dict(body),
                _content_type=MERGE_PATCH, _request_timeout=REQUEST_TIMEOUT,
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True


def _as_dict(value: object) -> dict[str, Any]:
    """Custom-object calls return decoded JSON, typed only as ``object`` by the generated client."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object from the API server, got {type(value).__name__}")
    return value


LIVE_STATES = ("Loading", "Running")


class StatusPatcher(Protocol):
    """What :class:`StatusWriter` needs from a client (ClusterClient, or a fake in tests)."""

    def patch_experiment_status(self, name: str, body: Mapping[str, Any]) -> bool: ...


class StatusWriter:
    """Sends experiment status patches one at a time and re-sends heartbeats of live experiments.

    One lock orders every write, so a heartbeat can never land after, and undo, a newer report
    (Completed must not turn back into Running), and after :meth:`forget` returns no write for
    that experiment follows (its placement may have moved to another replica).
    """

    def __init__(
        self,
        cluster: StatusPatcher,
        *,
        heartbeat_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cluster = cluster
        self._heartbeat = heartbeat_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, float] = {}  # name -> when its status was last written
        self._thread: threading.Thread | None = None

    def write(self, name: str, body: Mapping[str, Any]) -> bool:
        """Send one status patch; remember the experiment for heartbeats while its state is live."""
        with self._lock:
            written = self._cluster.patch_experiment_status(name, body)
            state = (body.get("status", {}).get("training") or {}).get("state")
            if written and state in LIVE_STATES:
                self._live[name] = self._clock()
            elif state is not None or not written:
                self._live.pop(name, None)
            return written

    def forget(self, name: str) -> None:
        """Write nothing more for this experiment."""
        with self._lock:
            self._live.pop(name, None)

    def beat(self) -> None:
        """Refresh lastHeartbeatTime of every live experiment not written for a heartbeat period."""
        with self._lock:
            now = self._clock()
            for name in [n for n, at in self._live.items() if now - at >= self._heartbeat]:
                # Only the time: the rest of status.training is the last report, still true.
                body = {"status": {"training": {"lastHeartbeatTime": now_rfc3339()}}}
                try:
                    written = self._cluster.patch_experiment_status(name, body)
                except API_ERRORS as exc:
                    log.warning("event=heartbeat_failed experiment=%s error=%s", name, exc)
                    continue
                if written:
                    self._live[name] = now
                else:
                    self._live.pop(name, None)

    def start(self, stop: threading.Event) -> None:
        """Beat in a daemon thread until ``stop`` is set."""

        def loop() -> None:
            while not stop.wait(min(1.0, self._heartbeat / 4)):
                try:
                    self.beat()
                except Exception:  # the heartbeat must outlive any one bad request
                    log.exception("event=heartbeat_error")

        self._thread = threading.Thread(target=loop, name="loraplex-heartbeat", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the heartbeat thread after its stop event was set."""
        if self._thread is not None:
            self._thread.join(timeout)
