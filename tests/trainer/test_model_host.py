"""Tests for the base model host: URI schemes, frozen loading, and the facts the scheduler reads."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from loraplex_trainer.model_host import BaseModel, ModelFacts, cache_root, load_base_model

HIDDEN, INTERMEDIATE, LAYERS = 64, 128, 2
KV = 32  # 2 kv heads x head size 16
TINY_LINEARS = {
    "q_proj": (HIDDEN, HIDDEN, LAYERS),
    "k_proj": (HIDDEN, KV, LAYERS),
    "v_proj": (HIDDEN, KV, LAYERS),
    "o_proj": (HIDDEN, HIDDEN, LAYERS),
    "gate_proj": (HIDDEN, INTERMEDIATE, LAYERS),
    "up_proj": (HIDDEN, INTERMEDIATE, LAYERS),
    "down_proj": (INTERMEDIATE, HIDDEN, LAYERS),
}


def test_file_uri_loads_a_frozen_model_and_left_padding_tokenizer(tiny_base: BaseModel) -> None:
    assert tiny_base.uri.startswith("file:///")
    assert not tiny_base.model.training
    assert not any(parameter.requires_grad for parameter in tiny_base.model.parameters())
    assert tiny_base.model.dtype == torch.float32
    assert tiny_base.tokenizer.pad_token is not None
    assert tiny_base.tokenizer.padding_side == "left"
    prompt = tiny_base.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "hi" in prompt


def test_facts_match_a_hand_count(tiny_base: BaseModel) -> None:
    vocab = len(tiny_base.tokenizer)
    per_layer = sum(i * o for i, o, _ in TINY_LINEARS.values()) + 2 * HIDDEN  # linears and two RMSNorms
    embeddings_and_head = 2 * vocab * HIDDEN  # untied
    assert (
        tiny_base.facts.parameter_count == LAYERS * per_layer + embeddings_and_head + HIDDEN
    )  # + final norm
    assert tiny_base.facts.linear_modules == TINY_LINEARS  # no lm_head, no embeddings


def test_lora_bytes_per_rank() -> None:
    facts = ModelFacts(parameter_count=0, linear_modules=TINY_LINEARS)
    # fp32 A [r, in] + B [out, r] per rank, in each of the two layers.
    assert facts.lora_bytes_per_rank(["q_proj", "v_proj"]) == 4 * 2 * ((64 + 64) + (64 + 32))
    assert facts.lora_bytes_per_rank("q_proj") == 4 * 2 * (64 + 64)
    assert facts.lora_bytes_per_rank() == 4 * sum((i + o) * n for i, o, n in TINY_LINEARS.values())
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] are not linear modules.*available: \['down_proj'"):
        facts.lora_bytes_per_rank(["qkv_proj"])


def test_facts_status_is_camel_case(tiny_base: BaseModel) -> None:
    status = tiny_base.facts.to_status()
    assert status["parameterCount"] == tiny_base.facts.parameter_count
    assert status["loraBytesPerRank"] == {  # type: ignore[comparison-overlap]
        suffix: 4 * (i + o) * n for suffix, (i, o, n) in TINY_LINEARS.items()
    }
    assert status["linearModules"]["down_proj"] == {"in": 128, "out": 64, "count": 2}  # type: ignore[index]
    assert (status["hiddenSize"], status["numLayers"]) == (64, 2)
    json.dumps(status)


def test_facts_status_feeds_the_operator_memory_model(tiny_base: BaseModel) -> None:
    """The trainer writes status.model; the operator's scheduler must be able to read all of it."""
    from loraplex_api.pool import ModelFactsStatus
    from loraplex_operator.memory import ModelFacts as OperatorFacts

    status = tiny_base.facts.to_status()
    ModelFactsStatus.model_validate(status)
    facts = OperatorFacts.from_status(status)
    assert facts is not None and facts.hidden_size == 64 and facts.num_layers == 2


def test_dtype_and_missing_pad_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token")
    config_path.write_text(json.dumps(config))

    base = load_base_model(f"file://{folder}", dtype="bfloat16")
    assert base.model.dtype == torch.bfloat16
    assert base.tokenizer.pad_token == base.tokenizer.eos_token


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        (
            "s3://bucket/model",
            ValueError,
            r"'s3://bucket/model' is not understood; accepted schemes: file://, hf://",
        ),
        ("just-a-name", ValueError, "accepted schemes"),
        ("file:///does/not/exist", FileNotFoundError, "not an existing absolute folder"),
        ("file://relative/path", FileNotFoundError, "not an existing absolute folder"),
        ("pvc://models/smollm2", ValueError, "mounted into trainer pods.*file:///"),
        (
            "builtin://gpt-17",
            ValueError,
            r"unknown builtin model 'gpt-17'; available: \['smollm2-135m-instruct'\]",
        ),
        (
            "hf://loraplex-tests/never-downloaded",
            FileNotFoundError,
            "not in the Hugging Face cache and the hub cannot be reached",
        ),
    ],
)
def test_bad_uris_say_what_is_wrong(uri: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_base_model(uri)


def test_bad_dtype(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="dtype 'int8'.*one of \\['bfloat16', 'float16', 'float32'\\]"):
        load_base_model(f"file://{tiny_model_dir}", dtype="int8")


def test_hf_uri_reads_the_local_cache_only(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Hugging Face cache laid out by hand: models--org--name/{refs/main, snapshots/<commit>/}.
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--loraplex-tests--tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    base = load_base_model("hf://loraplex-tests/tiny")
    assert base.facts.linear_modules == TINY_LINEARS


def test_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LORAPLEX_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "loraplex"
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.delenv("LORAPLEX_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "loraplex"


@pytest.mark.slow
def test_builtin_smollm2_is_dequantized_once_then_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    caplog.set_level(logging.INFO, logger="loraplex_trainer.model_host")
    started = time.perf_counter()
    first = load_base_model("builtin://smollm2-135m-instruct")
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    second = load_base_model("builtin://smollm2-135m-instruct")
    second_seconds = time.perf_counter() - started

    assert sum("builtin model dequantized" in record.message for record in caplog.records) == 1
    assert list((tmp_path / "builtin").glob("*/model.safetensors"))
    assert not list((tmp_path / "builtin").glob(".*"))  # no staging folder left behind
    assert second_seconds < first_seconds
    assert second.facts == first.facts
    assert first.facts.linear_modules["q_proj"] == (576, 576, 30)
    assert first.facts.parameter_count == 134_515_008  # embeddings tied with the head, counted once
    for name, parameter in first.model.state_dict().items():
        assert torch.equal(parameter, second.model.state_dict()[name]), name

    messages = [{"role": "user", "content": "What is 2+2?"}]
    inputs = second.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = second.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert "4" in second.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :])
