"""Timestamps as Kubernetes writes them (RFC 3339, UTC, whole seconds) and back to Unix time."""

from __future__ import annotations

from datetime import datetime, timezone


def to_rfc3339(unix: float) -> str:
    """Format Unix time the way the API server does: ``2025-01-31T12:00:00Z``."""
    return datetime.fromtimestamp(unix, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def from_rfc3339(text: str | None) -> float | None:
    """Parse an RFC 3339 timestamp (with ``Z`` or an offset, with or without fractions); None if absent or bad."""
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()
