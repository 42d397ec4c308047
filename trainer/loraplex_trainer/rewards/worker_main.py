"""The reward worker: a fresh interpreter that loads the user's reward function and scores batches.

python_worker.py runs this file as a script (``python worker_main.py FILE FUNCTION``); it imports
only the standard library, so nothing of the trainer (torch, adapters, other experiments) exists
here. Protocol, one JSON object per line on the original stdin/stdout:

- on start the worker writes ``{"ready": true}`` or ``{"error": {...}}`` and exits;
- each request ``{"samples": [[prompt, completion, row], ...]}`` gets ``{"rewards": [...]}`` or
  ``{"error": {"type", "message", "sample", "line", "traceback"}}``;
- end of input ends the worker.
"""

import importlib.util
import json
import numbers
import os
import sys
import traceback
from typing import Any, TextIO

MODULE_NAME = "loraplex_user_reward"


def _error(exc: BaseException, path: str, sample: int | None = None) -> dict[str, Any]:
    """Describe an exception of the user's code, with the line of the user's file it came from."""
    line = getattr(exc, "lineno", None) if isinstance(exc, SyntaxError) else None
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename) == path:
            line = frame.lineno
    return {
        "type": type(exc).__name__,
        # str() of a SyntaxError repeats the file and line, which "line" already carries.
        "message": exc.msg if isinstance(exc, SyntaxError) else str(exc),
        "sample": sample,
        "line": line,
        "traceback": "".join(traceback.format_exception(exc)),
    }


def _load(path: str, function: str) -> Any:
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered so pickling, dataclasses and typing inside the user's module can find it.
    sys.modules[MODULE_NAME] = module
    spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise AttributeError(f"the file defines no {function!r}")
    fn = getattr(module, function)
    if not callable(fn):
        raise TypeError(f"{function!r} is not callable: it is the {type(fn).__name__} {repr(fn)[:40]}")
    return fn


def _score(fn: Any, samples: list[list[Any]], path: str) -> dict[str, Any]:
    rewards = []
    for i, (prompt, completion, row) in enumerate(samples):
        try:
            value = fn(prompt, completion, row)
        except Exception as exc:  # the user's bug, reported back; the worker lives on
            return {"error": _error(exc, path, sample=i)}
        if not isinstance(value, numbers.Real):
            shown = repr(value)[:80]
            message = f"returned {type(value).__name__} {shown}, expected a float"
            return {"error": {"type": "TypeError", "message": message, "sample": i, "line": None}}
        rewards.append(float(value))
    return {"rewards": rewards}


def _send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def main() -> None:
    """Load the function named on the command line, then answer requests until stdin closes."""
    path, function = os.path.abspath(sys.argv[1]), sys.argv[2]
    # As a script, this package's folder is sys.path[0], where its http.py would shadow the
    # standard library's http for the user's imports; the user's own folder belongs there.
    sys.path[0] = os.path.dirname(path)
    # Keep the protocol on private copies of the pipes: a print() in user code goes to stderr
    # and an input() sees end of file, neither can corrupt the stream of replies.
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)

    try:
        fn = _load(path, function)
    except BaseException as exc:  # includes SyntaxError and SystemExit from module top level
        _send(replies, {"error": _error(exc, path)})
        return
    _send(replies, {"ready": True})
    for line in requests:
        _send(replies, _score(fn, json.loads(line)["samples"], path))


if __name__ == "__main__":
    main()
