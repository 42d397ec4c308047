"""spec.trainer.rolloutEngine resolved on the device at hand (this environment has no vLLM)."""

from __future__ import annotations

import pytest

from loraplex_trainer.rollout.choice import EngineUnavailable, choose_engine, vllm_installed


def test_torch_is_chosen_when_asked_and_by_auto_without_cuda_or_vllm() -> None:
    assert not vllm_installed()
    assert choose_engine("torch", "cuda:0") == "torch"
    assert choose_engine("auto", "cpu") == "torch"
    assert choose_engine("auto", "cuda:0") == "torch"  # no vLLM here


def test_auto_picks_vllm_on_cuda_where_it_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loraplex_trainer.rollout.choice.vllm_installed", lambda: True)
    assert choose_engine("auto", "cuda:0") == "vllm"
    assert choose_engine("auto", "cpu") == "torch"  # vLLM on CPU only when asked for
    assert choose_engine("vllm", "cpu") == "vllm"


def test_vllm_asked_for_but_missing_says_how_to_install_it() -> None:
    with pytest.raises(
        EngineUnavailable,
        match=r"^spec.trainer.rolloutEngine: vllm is not installed here; .*pip install vllm",
    ):
        choose_engine("vllm", "cpu")
