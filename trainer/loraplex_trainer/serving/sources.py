"""Where the promoted map comes from, and how a checkpoint it names becomes a folder vLLM may load."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from ..checkpoint import MANIFEST_FILE

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_ADAPTER_BYTES = 4 * 2**30


class PromotedSource(Protocol):
    """Where the promoted map comes from: experiment name -> checkpoint URI."""

    def read(self) -> dict[str, str]: ...


@dataclass
class ConfigMapSource:
    """The pool's promoted-adapters ConfigMap, read through the API (seconds, not the kubelet's minute)."""

    namespace: str
    name: str
    _client: Any = None

    def read(self) -> dict[str, str]:
        if self._client is None:
            from ..cluster import ClusterClient

            self._client = ClusterClient(self.namespace)
        return self._client.read_config_map(self.name) or {}


@dataclass
class ConfigMapFolderSource:
    """The ConfigMap mounted as a volume (one file per key), as the kubelet projects it."""

    folder: Path

    def read(self) -> dict[str, str]:
        return {
            p.name: p.read_text().strip()
            for p in sorted(self.folder.iterdir())
            if p.is_file() and not p.name.startswith(".")
        }


@dataclass
class RunDirSource:
    """A ``loraplex train`` run folder: each experiment's final adapter, else its newest checkpoint."""

    run_dir: Path

    def read(self) -> dict[str, str]:
        found = {}
        for folder in sorted(p for p in self.run_dir.iterdir() if p.is_dir()):
            final = folder / "adapter"
            checkpoints = (
                sorted((folder / "checkpoints").glob("step-*")) if (folder / "checkpoints").is_dir() else []
            )
            chosen = (
                final
                if (final / "adapter_config.json").is_file()
                else (checkpoints[-1] if checkpoints else None)
            )
            if chosen is not None:
                found[folder.name] = f"file://{chosen}"
        return found


STEP_FOLDER = re.compile(r"step-\d{8}")


def local_path(
    uri: str,
    claims: Mapping[str, Path],
    *,
    experiment: str | None = None,
    namespace: str | None = None,
    allow_files: bool = True,
) -> Path:
    """The folder a checkpoint URI names here: ``pvc://claim/path`` under that claim's mount, or ``file://``.

    Refused: a claim not mounted, a path that leaves its mount, ``file://`` where ``allow_files``
    is off (a serving pod), a relative path; and, given ``experiment`` and ``namespace``, a pvc://
    path that is not one of that experiment's checkpoints (``.../<namespace>/<experiment>/.../
    checkpoints/step-NNNNNNNN``), so one experiment's entry cannot serve another's weights.
    """
    scheme, _, rest = uri.partition("://")
    if scheme == "file":
        if not allow_files:
            raise ValueError(f"{uri}: a serving pod serves pvc:// checkpoints only")
        path = Path(rest)
        if not path.is_absolute():
            raise ValueError(f"{uri}: not an absolute path")
        return path
    if scheme != "pvc":
        raise ValueError(f"{uri}: only pvc:// and file:// checkpoints can be served")
    claim, _, inside = rest.partition("/")
    if claim not in claims:
        raise ValueError(f"{uri}: claim {claim!r} is not mounted in this serving pod")
    root = claims[claim].resolve()
    path = (root / inside).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{uri}: the path leaves the claim")
    if experiment is not None and namespace is not None:
        parts = PurePosixPath(inside).parts
        owned = any(parts[i : i + 2] == (namespace, experiment) for i in range(len(parts) - 1))
        if not owned or len(parts) < 2 or parts[-2] != "checkpoints" or not STEP_FOLDER.fullmatch(parts[-1]):
            raise ValueError(f"{uri}: not a checkpoint of experiment {namespace}/{experiment}")
    return path


def revision_of(uri: str) -> str:
    """A checkpoint's revision: its folder name (``step-00000020``), ``final`` for a final adapter."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    return "final" if name == "adapter" else name


def stage_adapter(source: Path, root: Path, *, verify_manifest: bool) -> Path:
    """Copy a checkpoint's adapter files into a private folder of ``root`` and return it.

    vLLM re-reads an adapter's folder whenever it evicts and reloads it, and keys its prefix cache
    by path; the copy stays the same until it is unloaded whatever happens to the storage
    (pruning, a rewrite, a symlink swapped in). Only regular files are read (no symlinks), each
    at most ``MAX_ADAPTER_BYTES``; with ``verify_manifest`` the copies must match the checkpoint's
    manifest (sizes and SHA-256), so a half-written or altered checkpoint is refused.
    """
    manifest: dict[str, Any] = {}
    if verify_manifest:
        try:
            manifest = json.loads(_read_regular(source / MANIFEST_FILE, 2**20))["files"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{source}: no readable {MANIFEST_FILE} ({exc.__class__.__name__})") from exc
    folder = Path(tempfile.mkdtemp(prefix="adapter-", dir=root))
    try:
        for name in ADAPTER_FILES:
            data = _read_regular(source / name, MAX_ADAPTER_BYTES)
            if verify_manifest:
                entry = manifest.get(name) or {}
                if entry.get("size") != len(data) or entry.get("sha256") != hashlib.sha256(data).hexdigest():
                    raise ValueError(f"{source / name}: does not match the checkpoint's manifest")
            (folder / name).write_bytes(data)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _read_regular(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refusing symlinks, other kinds of file and files above ``limit``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path}: not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{path}: {info.st_size} bytes, above the {limit} allowed")
        return f.read(limit + 1)
