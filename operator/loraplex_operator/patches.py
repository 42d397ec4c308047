"""JSON merge patches: the minimal patch between two states, and a ledger of the operator's own writes.

Why a ledger: decisions read objects from watch-fed indexes, which lag the
operator's own writes by one watch round trip. A pass that runs in between
would see an experiment as still pending and place it twice. The ledger
remembers what the operator last wrote to each object's operator-owned fields
and lays it over the observed object until the watch shows the write (the
same idea as the "expectations" of Kubernetes' own controllers). Only the
operator writes those fields (docs/architecture.md, who writes what), so its own last
write is the truth for them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any


def merge(target: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Apply a JSON merge patch (RFC 7386): dicts merge, None deletes, anything else replaces."""
    result = dict(target)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merge(result[key], value)
        elif isinstance(value, Mapping):
            result[key] = merge({}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def minimal_patch(observed: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The smallest merge patch that makes ``observed`` agree with ``desired`` on the keys desired names.

    A None in ``desired`` means "absent". Keys that ``desired`` does not name are left alone,
    which is how the operator leaves the trainer's fields (``training``, ``model``...) untouched.
    """
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        have = observed.get(key)
        if want is None:
            if have is not None:
                patch[key] = None
        elif isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = minimal_patch(have, want)
            if sub:
                patch[key] = sub
        elif isinstance(want, Mapping):
            cleaned = _without_nones(want)
            if cleaned or have is not None:
                patch[key] = cleaned
        elif want != have:
            patch[key] = want
    return patch


def _without_nones(value: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in value.items():
        if isinstance(v, Mapping):
            inner = _without_nones(v)
            if inner:
                out[k] = inner
        elif v is not None:
            out[k] = v
    return out


@dataclass
class _Entry:
    patch: dict[str, Any]
    at: float


@dataclass
class Ledger:
    """The operator's last writes per object, laid over observed objects until the watch catches up."""

    ttl: float = 60.0
    """After this long an unseen write is forgotten (someone else changed the object since)."""
    clock: Callable[[], float] = time.monotonic
    _entries: dict[Hashable, _Entry] = field(default_factory=dict)

    def record(self, key: Hashable, patch: Mapping[str, Any]) -> None:
        """Remember a patch that was just written (merged into any earlier unseen one)."""
        earlier = self._entries.get(key)
        combined = _merge_patches(earlier.patch, patch) if earlier is not None else dict(patch)
        self._entries[key] = _Entry(combined, self.clock())

    def overlay(self, key: Hashable, observed: Mapping[str, Any]) -> dict[str, Any]:
        """The observed object with the unseen writes laid over it; forgets writes the watch has shown."""
        entry = self._entries.get(key)
        if entry is None:
            return dict(observed)
        if self.clock() - entry.at > self.ttl or not minimal_patch(observed, entry.patch):
            del self._entries[key]
            return dict(observed)
        return merge(observed, entry.patch)

    def forget(self, key: Hashable) -> None:
        """Drop what is remembered about a deleted object."""
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


def _merge_patches(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any]:
    """One patch with the effect of applying ``first`` then ``second``, keeping deletions."""
    result = dict(first)
    for key, value in second.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = _merge_patches(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result
