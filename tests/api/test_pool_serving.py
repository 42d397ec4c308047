"""spec.serving's own rules: storage to serve from, and the `vllm serve` flags loraplex keeps."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from loraplex_api import SharedBasePool


def _pool(**spec: object) -> dict:
    return {"metadata": {"name": "p"}, "spec": {"model": {"name": "m", "uri": "hf://a/b"}, **spec}}


def test_serving_needs_a_storage_claim_to_read_the_checkpoints_from() -> None:
    with pytest.raises(ValidationError, match="serving.enabled needs storage.claimName"):
        SharedBasePool.model_validate(_pool(serving={"enabled": True}))
    SharedBasePool.model_validate(_pool(serving={"enabled": True}, storage={"claimName": "shared"}))
    SharedBasePool.model_validate(_pool(serving={"enabled": False}))


@pytest.mark.parametrize(
    "arg", ["--host", "--host=0.0.0.0", "--port", "--served-model-name", "--max-loras=2"]
)
def test_serving_args_cannot_override_what_loraplex_sets(arg: str) -> None:
    with pytest.raises(ValidationError, match=r"args\[1\]: --[a-z-]+ is set by loraplex"):
        SharedBasePool.model_validate(_pool(serving={"args": ["--max-model-len", arg, "x"]}))
    SharedBasePool.model_validate(
        _pool(serving={"args": ["--max-model-len", "4096", "--gpu-memory-utilization=0.8"]})
    )
