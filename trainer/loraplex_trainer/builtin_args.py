"""Typed reading of a builtin's ``args`` map (builtin rewards and datasets), with errors naming the field."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from loraplex_api.patterns import PatternError, compile_pattern


class ArgReader:
    """Reads ``args`` one typed value at a time; ``finish`` then rejects names nobody asked for.

    Every mistake raises ``error`` (RewardError, DatasetError) with a message starting
    ``<where>.args.<name>:``, e.g. ``reward.builtin.args.tolerance: -1 is below the minimum 0``.
    """

    def __init__(self, args: Mapping[str, Any], *, where: str, owner: str, error: type[Exception]) -> None:
        self._args = dict(args)
        self._where = where
        self._owner = owner
        self._error_type = error
        self._known: list[str] = []

    def _take(self, name: str) -> Any:
        self._known.append(name)
        return self._args.get(name)

    def error(self, name: str, message: str) -> Exception:
        """An error about argument ``name``, in the caller's error type."""
        return self._error_type(f"{self._where}.args.{name}: {message}")

    def _missing(self, name: str) -> Exception:
        # A missing required argument is often a typo of it; show what was given.
        given = f" (given: {', '.join(sorted(self._args))})" if self._args else ""
        return self.error(name, f"required by {self._owner}{given}")

    def flag(self, name: str, default: bool) -> bool:
        """A true/false argument."""
        value = self._take(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"{value!r} is not true or false")
        return value

    def number(
        self, name: str, default: float | None, minimum: float | None = None, maximum: float | None = None
    ) -> float:
        """A finite number in [minimum, maximum]; ``default`` None makes it required."""
        value = self._take(name)
        if value is None:
            if default is None:
                raise self._missing(name)
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.error(name, f"{value!r} is not a number")
        return float(self._in_range(name, value, minimum, maximum))

    def integer(self, name: str, default: int, minimum: int | None = None, maximum: int | None = None) -> int:
        """A whole number in [minimum, maximum]."""
        value = self._take(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"{value!r} is not a whole number")
        return int(self._in_range(name, value, minimum, maximum))

    def _in_range(self, name: str, value: float, minimum: float | None, maximum: float | None) -> float:
        if minimum is not None and value < minimum:
            raise self.error(name, f"{value} is below the minimum {minimum}")
        if maximum is not None and value > maximum:
            raise self.error(name, f"{value} is above the maximum {maximum}")
        return value

    def choice(self, name: str, default: str, choices: Sequence[str]) -> str:
        """One of ``choices``."""
        value = self._take(name)
        if value is None:
            return default
        if value not in choices:
            raise self.error(name, f"{value!r} is not one of {', '.join(choices)}")
        return str(value)

    def text(self, name: str, default: str | None) -> str:
        """A string; ``default`` None makes it required."""
        value = self._take(name)
        if value is None:
            if default is None:
                raise self._missing(name)
            return default
        if not isinstance(value, str):
            raise self.error(name, f"{value!r} is not a string")
        return value

    def pattern(self, name: str, *, ignore_case: bool = False, dot_all: bool = False) -> Any:
        """A required regular expression, compiled with RE2 (linear-time ``search``/``fullmatch``)."""
        value = self.text(name, None)
        try:
            return compile_pattern(value, ignore_case=ignore_case, dot_all=dot_all)
        except PatternError as error:
            raise self.error(name, str(error)) from None

    def finish(self) -> None:
        """Reject arguments nobody read (a typo would otherwise be silently ignored)."""
        unknown = sorted(set(self._args) - set(self._known))
        if unknown:
            known = ", ".join(self._known) or "none"
            raise self.error(unknown[0], f"unknown argument for {self._owner} (known: {known})")
