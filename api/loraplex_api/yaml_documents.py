"""YAML documents read within bounds: size, nesting depth and what aliases expand to.

A 1 KB file of nested aliases (a "billion laughs") expands to gigabytes once anything walks
it, and 500 levels of nesting overflow Python's recursion in the loader. A manifest is
Kubernetes-sized (an object is at most ~1.5 MiB in etcd), so a document that is bigger, deeper
or expands further than a manifest could is refused before it is built, with the line where
it goes wrong. The C (libyaml) parser is used where PyYAML has it: it is about 10x faster.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import yaml

MAX_FILE_BYTES = 64 << 20
MAX_DOCUMENT_BYTES = 3 << 20
"""Kubernetes refuses requests above 3 MiB."""
MAX_DEPTH = 64
MAX_NODES = 200_000
"""Scalars and collections in one document, counting every alias as the node it stands for."""

Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class DocumentError(ValueError):
    """The text is not YAML this reader accepts; one line saying where and why."""


def load_documents(data: bytes) -> list[Any]:
    """Every document of a YAML stream, or DocumentError for text outside the bounds (or not UTF-8)."""
    if len(data) > MAX_FILE_BYTES:
        raise DocumentError(f"is {len(data)} bytes; at most {MAX_FILE_BYTES} are read")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start})"
        ) from None
    try:
        check_bounds(text)
        return list(yaml.load_all(text, Loader=Loader))
    except yaml.YAMLError as exc:
        raise DocumentError(f"invalid YAML: {_one_line(exc)}") from None


def check_bounds(text: str) -> None:
    """Walk the parser's events once: raise DocumentError at the first bound a document breaks."""
    sizes: dict[str, int] = {}  # anchor -> nodes its value stands for
    open_nodes: list[tuple[str | None, int]] = []  # collections being read: (anchor, nodes so far)
    nodes = 0
    document_start = 0
    events: Iterable[Any] = yaml.parse(text, Loader=Loader)  # type() checks below: mypy cannot narrow
    for event in events:
        kind = type(event)
        if kind is yaml.ScalarEvent:  # most events: keep this path short
            nodes += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
            nodes += 1
            open_nodes.append((event.anchor, nodes - 1))
            if len(open_nodes) > MAX_DEPTH:
                raise DocumentError(f"{_where(event)}: nested deeper than {MAX_DEPTH} levels")
        elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
            anchor, start = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = nodes - start
        elif kind is yaml.AliasEvent:
            if any(anchor == event.anchor for anchor, _ in open_nodes):
                raise DocumentError(f"{_where(event)}: alias *{event.anchor} is inside the value it names")
            nodes += sizes.get(event.anchor or "", 1)
            if nodes > MAX_NODES:
                raise DocumentError(
                    f"{_where(event)}: alias *{event.anchor} makes the document larger than {MAX_NODES} nodes"
                )
        elif kind is yaml.DocumentStartEvent:
            nodes, sizes, document_start = 0, {}, _index(event)
        elif kind is yaml.DocumentEndEvent:
            if nodes > MAX_NODES:
                raise DocumentError(f"{_where(event)}: the document is larger than {MAX_NODES} nodes")
            if _index(event, end=True) - document_start > MAX_DOCUMENT_BYTES:
                raise DocumentError(f"{_where(event)}: a document over {MAX_DOCUMENT_BYTES} bytes")


def _index(event: yaml.Event, *, end: bool = False) -> int:
    mark = event.end_mark if end else event.start_mark
    return int(mark.index) if mark is not None else 0


def _where(event: yaml.Event) -> str:
    mark = event.start_mark
    return f"line {mark.line + 1}" if mark is not None else "somewhere"


def _one_line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what
