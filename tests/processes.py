"""Running the `loraplex` command as a child process, as a user or a pod runs it, from this checkout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("api", "cli", "operator", "trainer")


def checkout_env(**extra: str) -> dict[str, str]:
    """This process's environment with the checkout's package folders first on PYTHONPATH."""
    path = os.pathsep.join(str(REPO / folder) for folder in PACKAGE_FOLDERS)
    return {**os.environ, "PYTHONPATH": path, **extra}


def loraplex(*args: str) -> list[str]:
    """The command line of ``loraplex ARGS`` with this interpreter."""
    return [sys.executable, "-m", "loraplex_cli", *args]
