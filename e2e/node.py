"""One Kubernetes node for the end-to-end tests: the StatefulSet controller and a kubelet in a thread.

The API server is the emulator of the operator's integration tests (KMock plus
the bookkeeping it lacks). What this module adds is what a cluster does with
the objects the operator writes:

- **The StatefulSet controller.** Pods ``<set>-<ordinal>`` for every ordinal
  below ``spec.replicas``, with the template's labels and annotations plus
  ``statefulset.kubernetes.io/pod-name`` and ``controller-revision-hash``, owned
  by the set. A pod is never created while its predecessor of the same name is
  still terminating. Scale-down deletes the ordinals above the count (all at
  once: the operator renders ``podManagementPolicy: Parallel``). A changed
  template rolls the pods one at a time, highest ordinal first, each only when
  every pod is Ready again (``RollingUpdate``). ``status`` (replicas,
  readyReplicas, updatedReplicas, the revisions) is written through ``/status``.
- **The kubelet.** Each pod's container runs as a local process: its
  ``command``/``args`` with ``env`` (``value`` and ``fieldRef`` on the pod's
  metadata resolved), its volumes as folders (an ``emptyDir`` per pod and
  volume, a folder per PersistentVolumeClaim shared by every pod that mounts
  it, ``subPath`` inside it), its CPU limit as a CPU affinity (the trainer reads
  its thread count from it, as from a cgroup). Ready follows ``GET /readyz``
  on the health port. An exited container is restarted (``restartPolicy:
  Always``) with a growing back-off, ``restartCount`` counted and the waiting
  reason ``CrashLoopBackOff`` shown meanwhile. A deleted pod gets SIGTERM, then
  SIGKILL after ``terminationGracePeriodSeconds``, and the object goes away
  only once its process has exited — as graceful deletion does.

Where one machine cannot be many pods, the differences are on purpose and
small: processes share the filesystem and the network, so the container's
paths in ``args`` and ``env`` values (``/var/lib/loraplex``, ``/tmp``...) are
rewritten to the volume folders they are mounted from, and its declared ports
to free local ports (``--health-port=8081`` becomes the port mapped for 8081).
The service account's in-cluster credentials are a ``KUBECONFIG`` for the
emulator. Processes run as the test's user, not ``runAsUser``. Probe periods
and back-offs are scaled down to keep the tests short.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tests.operator.integration.conftest import Api, ApiError

log = logging.getLogger(__name__)

POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
REVISION_LABEL = "controller-revision-hash"
GRACEFUL = "e2e.loraplex.dev/graceful-deletion"
"""A finalizer the kubelet holds on every pod: KMock deletes at once what has none, while an API
server only marks a pod (deletionTimestamp) and the kubelet removes it once its containers stopped."""
PROBE_SECONDS = 0.5
BACKOFF_SECONDS = (1.0, 2.0, 4.0, 8.0)
"""Restart back-off of an exited container (a kubelet's: 10 s doubling up to 5 min)."""
_PORT_FLAG = re.compile(r"^(--[\w-]*port)=(\d+)$")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def template_revision(statefulset: dict[str, Any]) -> str:
    """The ``controller-revision-hash`` of a StatefulSet's current template."""
    template = json.dumps(statefulset["spec"]["template"], sort_keys=True, separators=(",", ":"))
    return f"{statefulset['metadata']['name']}-{hashlib.sha256(template.encode()).hexdigest()[:10]}"


def ordinal_of(pod_name: str) -> int:
    return int(pod_name.rsplit("-", 1)[1])


@dataclass
class Container:
    """The one container of a pod, as the kubelet keeps it."""

    pod: str
    uid: str
    folder: Path
    ports: dict[int, int]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    ready: bool = False
    ready_changed: str = field(default_factory=_now)
    started: str = ""
    waiting: str = "ContainerCreating"
    restart_at: float = 0.0
    kill_at: float | None = None
    """Set once the pod is being deleted: SIGTERM was sent, SIGKILL follows at this time."""
    exit_codes: list[int] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_path(self) -> Path:
        return self.folder / "trainer.log"


class Node:
    """The StatefulSet controller and the kubelet of one node, against the emulator's API."""

    def __init__(self, api: Api, root: Path, *, kubeconfig: Path, extra_env: dict[str, str] | None = None):
        self.api = api
        self.root = root
        self.kubeconfig = kubeconfig
        self.extra_env = dict(extra_env or {})
        self.containers: dict[str, Container] = {}
        """Pod name -> its container, while the pod exists here (also while it terminates)."""
        self.history: list[tuple[str, str, int]] = []
        """(pod, uid, exit code) of every container that exited, in order."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="node", daemon=True)
        self._next_cpu = 0
        self.errors: list[str] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Node:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop every container as a node shutting down does (SIGTERM, then SIGKILL)."""
        self._stop.set()
        self._thread.join(30)
        for container in list(self.containers.values()):
            if container.running:
                assert container.process is not None
                container.process.send_signal(signal.SIGTERM)
        for container in list(self.containers.values()):
            if container.process is not None:
                try:
                    container.process.wait(30)
                except subprocess.TimeoutExpired:
                    container.process.kill()
                    container.process.wait(10)

    def pvc(self, claim: str) -> Path:
        """The folder a PersistentVolumeClaim is provisioned as (created on first use)."""
        folder = self.root / "pvc" / claim
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # -- what a test does to pods ----------------------------------------------------------

    def kill(self, pod: str) -> int:
        """SIGKILL a pod's container, as the OOM killer or a crash would; the kubelet restarts it."""
        with self._lock:
            container = self.containers[pod]
            assert container.process is not None and container.running, f"{pod} is not running"
            container.process.kill()
            return container.process.pid

    def evict(self, pod: str) -> None:
        """Delete a pod gracefully, as ``kubectl drain`` or ``kubectl delete pod`` does."""
        self.api.delete("Pod", pod)

    def log(self, pod: str) -> str:
        """What the current pod of this name wrote so far, over all its restarts (``kubectl logs``)."""
        container = self.containers.get(pod)
        if container is None or not container.log_path().exists():
            return ""
        return container.log_path().read_text(errors="replace")

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as error:  # the test sees it in self.errors and in its failure
                log.exception("node tick failed")
                self.errors.append(repr(error))
            self._stop.wait(0.2)

    def _tick(self) -> None:
        pods = {p["metadata"]["name"]: p for p in self.api.list("Pod")}
        for statefulset in self.api.list("StatefulSet"):
            self._reconcile_statefulset(statefulset, pods)
        pods = {p["metadata"]["name"]: p for p in self.api.list("Pod")}
        with self._lock:
            for pod in pods.values():
                self._sync_pod(pod)
            for name in [n for n in self.containers if n not in pods]:
                self._forget(name)

    # -- the StatefulSet controller ------------------------------------------------------

    def _reconcile_statefulset(self, statefulset: dict[str, Any], pods: dict[str, dict[str, Any]]) -> None:
        meta, spec = statefulset["metadata"], statefulset["spec"]
        name, desired = meta["name"], int(spec.get("replicas") or 0)
        revision = template_revision(statefulset)
        owned = {
            n: p
            for n, p in pods.items()
            if any(o.get("uid") == meta["uid"] for o in p["metadata"].get("ownerReferences") or [])
        }
        for ordinal in range(desired):
            pod_name = f"{name}-{ordinal}"
            if pod_name not in pods and pod_name not in self.containers:
                self._create_pod(statefulset, pod_name, revision)
        deleting = [p for p in owned.values() if p["metadata"].get("deletionTimestamp")]
        for pod_name, pod in owned.items():
            if ordinal_of(pod_name) >= desired and not pod["metadata"].get("deletionTimestamp"):
                self.evict(pod_name)
        kept = [p for n, p in owned.items() if ordinal_of(n) < desired]
        outdated = [p for p in kept if p["metadata"]["labels"].get(REVISION_LABEL) != revision]
        if outdated and not deleting and len(kept) == desired and all(_ready(p) for p in kept):
            self.evict(max((p["metadata"]["name"] for p in outdated), key=ordinal_of))
        self._write_statefulset_status(statefulset, kept, revision)

    def _create_pod(self, statefulset: dict[str, Any], pod_name: str, revision: str) -> None:
        template = statefulset["spec"]["template"]
        meta = template.get("metadata") or {}
        labels = {**(meta.get("labels") or {}), POD_NAME_LABEL: pod_name, REVISION_LABEL: revision}
        owner = {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "name": statefulset["metadata"]["name"],
            "uid": statefulset["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "labels": labels,
                "annotations": dict(meta.get("annotations") or {}),
                "ownerReferences": [owner],
                "finalizers": [GRACEFUL],
            },
            "spec": {**template["spec"], "hostname": pod_name, "nodeName": "e2e"},
        }
        try:
            self.api.create(pod)
        except ApiError as error:
            if error.status != 409:
                raise

    def _write_statefulset_status(
        self, statefulset: dict[str, Any], pods: list[dict[str, Any]], revision: str
    ) -> None:
        status = {
            "observedGeneration": statefulset["metadata"].get("generation"),
            "replicas": len(pods),
            "readyReplicas": sum(1 for p in pods if _ready(p)),
            "availableReplicas": sum(1 for p in pods if _ready(p)),
            "updatedReplicas": sum(
                1 for p in pods if p["metadata"]["labels"].get(REVISION_LABEL) == revision
            ),
            "updateRevision": revision,
        }
        current = {k: v for k, v in (statefulset.get("status") or {}).items() if k in status}
        if current != status:
            self.api.patch_status("StatefulSet", statefulset["metadata"]["name"], status)

    # -- the kubelet ---------------------------------------------------------------------------

    def _sync_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        name, uid = meta["name"], meta["uid"]
        container = self.containers.get(name)
        if container is not None and container.uid != uid:
            return  # the old pod of this name is still terminating; the StatefulSet waits for it
        if container is None:
            container = self._admit(pod)
        if meta.get("deletionTimestamp"):
            self._terminate(pod, container)
            return
        if not container.running and time.monotonic() >= container.restart_at:
            if container.process is not None:  # it exited: restart it after the back-off
                self._record_exit(container)
                container.restarts += 1
                back_off = BACKOFF_SECONDS[min(container.restarts - 1, len(BACKOFF_SECONDS) - 1)]
                container.restart_at = time.monotonic() + back_off
                container.waiting = "CrashLoopBackOff"
                self._set_ready(container, False)
            else:
                self._run(pod, container)
        self._probe(pod, container)
        self._write_pod_status(pod, container)

    def _admit(self, pod: dict[str, Any]) -> Container:
        meta = pod["metadata"]
        folder = self.root / "pods" / f"{meta['name']}-{meta['uid'][:8]}"
        folder.mkdir(parents=True, exist_ok=True)
        declared = [p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports") or []]
        container = Container(pod=meta["name"], uid=meta["uid"], folder=folder, ports=_free_ports(declared))
        self.containers[meta["name"]] = container
        return container

    def _terminate(self, pod: dict[str, Any], container: Container) -> None:
        if container.kill_at is None:
            grace = float(pod["spec"].get("terminationGracePeriodSeconds", 30))
            container.kill_at = time.monotonic() + grace
            if container.running:
                assert container.process is not None
                container.process.send_signal(signal.SIGTERM)
        if container.running and time.monotonic() >= container.kill_at:
            assert container.process is not None
            container.process.kill()
        if not container.running:
            if container.process is not None:
                self._record_exit(container)
            try:  # the container has stopped: the pod object may go now
                self.api.patch("Pod", pod["metadata"]["name"], {"metadata": {"finalizers": None}})
            except ApiError as error:
                if error.status != 404:
                    raise

    def _forget(self, name: str) -> None:
        container = self.containers[name]
        if container.running:  # deleted without grace (e.g. --force): the kubelet kills it
            assert container.process is not None
            container.process.kill()
            container.process.wait(10)
        if container.process is not None:
            self._record_exit(container)
        del self.containers[name]

    def _record_exit(self, container: Container) -> None:
        assert container.process is not None
        code = container.process.wait()
        container.exit_codes.append(code)
        container.process = None
        self.history.append((container.pod, container.uid, code))

    def _run(self, pod: dict[str, Any], container: Container) -> None:
        spec = pod["spec"]
        (trainer,) = spec["containers"]
        paths = self._mounts(pod, trainer, container)
        env = self._env(pod, trainer, paths)
        argv = [_rewrite(a, paths, container.ports) for a in [*trainer.get("command", []), *trainer["args"]]]
        executable = shutil.which(argv[0], path=env["PATH"])
        if executable is None:
            raise FileNotFoundError(f"{argv[0]!r} is not on the container's PATH {env['PATH']}")
        prefix = self._affinity(trainer)
        with container.log_path().open("ab") as out:
            container.process = subprocess.Popen(
                [*prefix, executable, *argv[1:]],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=paths.get("/tmp", container.folder),
                start_new_session=True,
            )
        container.started = _now()
        container.waiting = ""
        container.kill_at = None

    def _mounts(self, pod: dict[str, Any], trainer: dict[str, Any], container: Container) -> dict[str, Path]:
        """Container path -> host folder for every volume mount."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        paths: dict[str, Path] = {}
        for mount in trainer.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                source = container.folder / "volumes" / volume["name"]
            elif "persistentVolumeClaim" in volume:
                source = self.pvc(volume["persistentVolumeClaim"]["claimName"])
            else:
                raise ValueError(f"volume {volume['name']}: only emptyDir and persistentVolumeClaim run here")
            if mount.get("subPath"):
                source = source / mount["subPath"]
            source.mkdir(parents=True, exist_ok=True)
            paths[mount["mountPath"]] = source
        return paths

    def _env(self, pod: dict[str, Any], trainer: dict[str, Any], paths: dict[str, Path]) -> dict[str, str]:
        """The container's env: the image's PATH, then the pod's entries resolved as the kubelet does."""
        env = {
            # The image's PATH: where `loraplex` is installed (this interpreter's bin folder here).
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"]),
            "KUBECONFIG": str(self.kubeconfig),
            **self.extra_env,
        }
        for entry in trainer.get("env") or []:
            if "value" in entry:
                env[entry["name"]] = _rewrite(entry["value"], paths, {})
            elif "fieldRef" in (entry.get("valueFrom") or {}):
                env[entry["name"]] = _field(pod, entry["valueFrom"]["fieldRef"]["fieldPath"])
            else:
                raise ValueError(f"env {entry['name']}: only value and fieldRef are resolved here")
        return env

    def _affinity(self, trainer: dict[str, Any]) -> list[str]:
        """``taskset`` for a CPU limit: the process sees as many CPUs as the limit allows."""
        limit = ((trainer.get("resources") or {}).get("limits") or {}).get("cpu")
        total = os.cpu_count() or 1
        if limit is None or shutil.which("taskset") is None:
            return []
        cpus = min(total, max(1, math.ceil(_cpu(limit))))
        chosen = [(self._next_cpu + i) % total for i in range(cpus)]
        self._next_cpu = (self._next_cpu + cpus) % total
        return ["taskset", "-c", ",".join(map(str, chosen))]

    def _probe(self, pod: dict[str, Any], container: Container) -> None:
        port = container.ports.get(_readiness_port(pod["spec"]["containers"][0]))
        ready = False
        if container.running and port is not None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=PROBE_SECONDS) as r:
                    ready = r.status == 200
            except OSError:
                ready = False
        self._set_ready(container, ready)

    def _set_ready(self, container: Container, ready: bool) -> None:
        if ready != container.ready:
            container.ready, container.ready_changed = ready, _now()

    def _write_pod_status(self, pod: dict[str, Any], container: Container) -> None:
        state: dict[str, Any]
        if container.running:
            state = {"running": {"startedAt": container.started}}
        else:
            state = {"waiting": {"reason": container.waiting or "ContainerCreating"}}
        flag = "True" if container.ready else "False"
        status = {
            "phase": "Running" if container.started else "Pending",
            "podIP": "127.0.0.1",
            "conditions": [
                {"type": "Ready", "status": flag, "lastTransitionTime": container.ready_changed},
                {"type": "ContainersReady", "status": flag, "lastTransitionTime": container.ready_changed},
            ],
            "containerStatuses": [
                {
                    "name": pod["spec"]["containers"][0]["name"],
                    "ready": container.ready,
                    "restartCount": container.restarts,
                    "started": container.running,
                    "state": state,
                }
            ],
        }
        if (pod.get("status") or {}) != {**(pod.get("status") or {}), **status}:
            self.api.patch_status("Pod", pod["metadata"]["name"], status)


def _ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _readiness_port(container: dict[str, Any]) -> int | None:
    """The container port the readiness probe's httpGet names (by number or by port name)."""
    port = ((container.get("readinessProbe") or {}).get("httpGet") or {}).get("port")
    if isinstance(port, int):
        return port
    named = {p.get("name"): p["containerPort"] for p in container.get("ports") or []}
    return named.get(port)


def _field(pod: dict[str, Any], path: str) -> str:
    """A ``fieldRef`` on the pod (``metadata.name``, ``metadata.namespace``, ``spec.nodeName``...)."""
    value: Any = pod
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        raise ValueError(f"fieldRef {path}: the pod has no such field")
    return str(value)


def _rewrite(value: str, paths: dict[str, Path], ports: dict[int, int]) -> str:
    """A container-side string with its mount paths and declared ports as this machine has them."""
    match = _PORT_FLAG.match(value)
    if match and int(match.group(2)) in ports:
        return f"{match.group(1)}={ports[int(match.group(2))]}"
    if not paths:
        return value
    # One pass, longest mount first, so a rewritten folder (under /tmp itself) is not rewritten again.
    mounts = "|".join(re.escape(m) for m in sorted(paths, key=len, reverse=True))
    pattern = rf"(?:^|(?<==)|(?<=file://))({mounts})(?=/|$)"
    return re.sub(pattern, lambda m: str(paths[m.group(1)]), value)


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _free_ports(declared: list[int]) -> dict[int, int]:
    mapped = {}
    for port in declared:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            mapped[port] = int(s.getsockname()[1])
    return mapped
