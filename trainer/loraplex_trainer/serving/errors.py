"""The one error of serving that a user can fix, said in one line."""

from __future__ import annotations


class ServingError(Exception):
    """A setup problem the user can fix, reported in one line."""
