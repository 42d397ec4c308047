"""Hostile YAML: bombs, deep nesting, non-UTF-8 and huge files get one line each, in bounded time and memory."""

from __future__ import annotations

import resource
import subprocess
import time
from pathlib import Path

import pytest

from loraplex_api import yaml_documents
from loraplex_api.yaml_documents import DocumentError, check_bounds, load_documents
from tests.processes import checkout_env, loraplex


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 9)}]")
    return "\n".join(lines) + "\n"


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (billion_laughs(), "line 6: alias *a4 makes the document larger than 200000 nodes"),
        (nested(500), "line 1: nested deeper than 64 levels"),
        ("a: &x [1, *x]\n", "line 1: alias *x is inside the value it names"),
        ("a: [1, 2\n", "invalid YAML: line 2, column 1: did not find expected ',' or ']'"),
    ],
)
def test_hostile_text_is_refused_with_the_line(text: str, message: str) -> None:
    with pytest.raises(DocumentError) as caught:
        load_documents(text.encode())
    assert str(caught.value) == message


def test_a_few_honest_aliases_are_fine() -> None:
    text = "base: &b {rank: 8, alpha: 16}\nfirst: *b\nsecond: *b\n"
    assert load_documents(text.encode()) == [
        {"base": {"rank": 8, "alpha": 16}}
        | {"first": {"rank": 8, "alpha": 16}, "second": {"rank": 8, "alpha": 16}}
    ]
    assert load_documents(nested(64).encode()) == [eval(nested(64))]  # noqa: S307 (our own literal)


def test_non_utf8_names_the_byte() -> None:
    with pytest.raises(DocumentError, match=r"^is not UTF-8 text \(byte 0xff at offset 6\)$"):
        load_documents(b"kind: \xff\xfe\n")


def test_size_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    big = "a: " + "x" * (yaml_documents.MAX_DOCUMENT_BYTES + 10) + "\n---\nb: 1\n"
    with pytest.raises(DocumentError, match=r"^line 2: a document over 3145728 bytes$"):
        check_bounds(big)
    monkeypatch.setattr(yaml_documents, "MAX_FILE_BYTES", 100)
    with pytest.raises(DocumentError, match=r"^is 101 bytes; at most 100 are read$"):
        load_documents(b"#" * 101)


def test_validate_refuses_a_bomb_within_bounded_time_and_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(billion_laughs())
    deep = tmp_path / "deep.yaml"
    deep.write_text(nested(500))
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("name: caf\xe9\n".encode("latin-1"))

    def limit_memory() -> None:  # a child that expanded the bomb would die of MemoryError
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    started = time.monotonic()
    done = subprocess.run(
        loraplex("validate", str(bomb), str(deep), str(latin1)),
        env=checkout_env(), capture_output=True, text=True, timeout=60, preexec_fn=limit_memory,
    )  # fmt: skip
    assert time.monotonic() - started < 20
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"File/{bomb}: line 6: alias *a4 makes the document larger than 200000 nodes",
        f"File/{deep}: line 1: nested deeper than 64 levels",
        f"File/{latin1}: is not UTF-8 text (byte 0xe9 at offset 9)",
    ]
