"""Where an experiment's inputs (dataset rows, reward code) come from: files and ConfigMap keys.

Standalone, files resolve against the manifest's folder and ConfigMaps do not exist; in a cluster
the agent resolves files against the pool's storage and passes the ConfigMaps it read. Callers
pass the error class to raise (DatasetError, RewardError), so a failure fails the right thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from loraplex_api.common import ConfigMapKeyRef


def resolve_file(file: str, base_dir: Path, *, where: str, error: type[Exception]) -> Path:
    """The path of ``file`` (absolute, or relative to ``base_dir``); ``error`` names it when it is missing."""
    path = Path(file) if Path(file).is_absolute() else base_dir / file
    if not path.is_file():
        raise error(f"{where}.file: {file}: no such file (looked for {path})")
    return path


def config_map_text(
    ref: ConfigMapKeyRef,
    config_maps: Mapping[tuple[str, str], str] | None,
    *,
    where: str,
    error: type[Exception],
) -> str:
    """The text under ``ref``; ``error`` says why it cannot be had."""
    if config_maps is None:
        raise error(
            f"{where}.configMap: {ref.name}/{ref.key} cannot be read here (standalone mode has no "
            f"ConfigMaps); use {where}.file instead"
        )
    if (ref.name, ref.key) not in config_maps:
        raise error(f"{where}.configMap: ConfigMap {ref.name} has no key {ref.key!r}")
    return config_maps[(ref.name, ref.key)]
