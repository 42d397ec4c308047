"""Regular expressions a user supplies, compiled with RE2: matching time is linear in the text, always.

Python's ``re`` backtracks: ``^(.|.)*X$`` against 40 characters takes longer than a training run,
and a reward runs inside the trainer's step, beside every other experiment on the replica. RE2
has no backreferences or lookarounds, so patterns that need them are refused at validation
(``loraplex validate``, ``kubectl apply`` via the operator's InvalidSpec) with the reason.
"""

from __future__ import annotations

from typing import Any

import re2

MAX_PATTERN_LENGTH = 4096
MAX_PROGRAM_BYTES = 8 << 20
"""RE2's memory budget for one compiled pattern (its default); larger patterns are refused."""


class PatternError(ValueError):
    """RE2 cannot compile the pattern; the message says why."""


def compile_pattern(pattern: str, *, ignore_case: bool = False, dot_all: bool = False) -> Any:
    """Compile with RE2 (``re``-like ``search``/``fullmatch``); PatternError when RE2 refuses it."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise PatternError(f"is {len(pattern)} characters long; at most {MAX_PATTERN_LENGTH} are allowed")
    options = re2.Options()
    options.case_sensitive = not ignore_case
    options.dot_nl = dot_all
    options.max_mem = MAX_PROGRAM_BYTES
    options.log_errors = False  # the error is raised to the caller, not printed to stderr
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = (
            exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        )
        hint = (
            " (backreferences and lookarounds are not supported)"
            if "perl operator" in reason or "escape" in reason
            else ""
        )
        raise PatternError(
            f"{pattern!r} is not accepted by the linear-time RE2 engine: {reason}{hint}"
        ) from None
