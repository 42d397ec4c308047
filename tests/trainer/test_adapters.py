"""Tests for MultiLoRAModel: a mixed batch equals PEFT row by row, adapters stay isolated, files are PEFT's."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from transformers import PreTrainedModel

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.model_host import BaseModel, load_base_model
from loraplex_trainer.multilora import AdapterConfig, LoRAPath, MultiLoRALinear

TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}
# Different ranks, alphas and targets side by side. (Names avoid substrings of "lora_", which PEFT warns about.)
CONFIGS = {
    "math": AdapterConfig(rank=4, alpha=8.0),
    "chat": AdapterConfig(rank=2, alpha=3.0, target_modules=("q_proj", "v_proj")),
    "code": AdapterConfig(rank=8, alpha=4.0, target_modules=("o_proj", "down_proj")),
}
ROWS = ["math", None, "chat", "math", "code", None]
PROMPTS = ["2+2=", "hello there", "abc", "The answer is", "x", "one two three"]


def multi_lora(base: BaseModel, configs: dict[str, AdapterConfig] = CONFIGS) -> MultiLoRAModel:
    """Wrap the tiny model and add adapters whose B is random, so every adapter changes the output."""
    model = MultiLoRAModel(base.model)
    for seed, (name, config) in enumerate(configs.items()):
        model.add_adapter(name, config, seed=seed)
        # Our own generator, not torch's global RNG: the weights (and so the tokens generated)
        # must not depend on which tests ran before and what they seeded.
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in model.adapter_parameters(name)[1::2]:  # the B matrices
                parameter.normal_(std=0.2, generator=generator)
    return model


def peft_twin(tiny_model_dir: Path, model: MultiLoRAModel) -> PeftModel:
    """The same base under PEFT's own LoRA, holding the same adapters with the same weights."""
    peft_model: PeftModel | None = None
    for name, config in model.configs.items():
        peft_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            target_modules=config.target_modules,
            task_type="CAUSAL_LM",
        )
        if peft_model is None:
            peft_model = get_peft_model(load_base_model(f"file://{tiny_model_dir}").model, peft_config, name)
        else:
            peft_model.add_adapter(name, peft_config)
        set_peft_model_state_dict(peft_model, model.adapter_state_dict(name), adapter_name=name)
    assert peft_model is not None
    return peft_model


def peft_gradients(peft_model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """PEFT's gradients of one adapter, under PEFT's saved key names (adapter name dropped)."""
    return {
        key.replace(f".{name}.weight", ".weight"): parameter.grad
        for key, parameter in peft_model.named_parameters()
        if f".lora_A.{name}." in key or f".lora_B.{name}." in key
    }


def our_gradients(model: MultiLoRAModel, name: str) -> dict[str, torch.Tensor | None]:
    """Our gradients of one adapter, under the same PEFT key names."""
    return {
        key: parameter.grad
        for key, parameter in zip(model.adapter_state_dict(name), model.adapter_parameters(name), strict=True)
    }


def batch(base: BaseModel) -> dict[str, torch.Tensor]:
    """Left-padded prompts of different lengths, as rollouts and training see them."""
    return dict(base.tokenizer(PROMPTS, return_tensors="pt", padding=True))


def test_injection_wraps_decoder_linears_only_and_freezes_the_base(tiny_base: BaseModel) -> None:
    model = MultiLoRAModel(tiny_base.model)
    wrapped = {name for name, module in model.model.named_modules() if isinstance(module, MultiLoRALinear)}
    assert len(wrapped) == 2 * 7  # two decoder layers, seven projections each
    assert all(name.startswith("model.layers.") for name in wrapped)
    assert not isinstance(model.model.lm_head, MultiLoRALinear)
    assert not any(parameter.requires_grad for parameter in model.parameters())
    with pytest.raises(ValueError, match="only once"):
        MultiLoRAModel(tiny_base.model)


@pytest.mark.parametrize("path", ["loop", "batched"])
def test_mixed_batch_matches_peft_outputs_and_gradients(
    tiny_base: BaseModel, tiny_model_dir: Path, path: LoRAPath
) -> None:
    model = multi_lora(tiny_base)
    model.lora_path = path
    inputs = batch(tiny_base)
    loss_weights = torch.randn(len(ROWS), inputs["input_ids"].shape[1], len(tiny_base.tokenizer))
    with model.use_adapters(ROWS):
        logits = model(**inputs).logits
    (logits * loss_weights).sum().backward()

    peft_model = peft_twin(tiny_model_dir, model)
    with peft_model.disable_adapter():
        base_logits = peft_model(**inputs).logits
    base_rows = [i for i, name in enumerate(ROWS) if name is None]
    torch.testing.assert_close(logits[base_rows], base_logits[base_rows], **TOLERANCE)
    for name in CONFIGS:
        rows = [i for i, row_name in enumerate(ROWS) if row_name == name]
        peft_model.set_adapter(name)
        peft_logits = peft_model(**inputs).logits
        (peft_logits[rows] * loss_weights[rows]).sum().backward()
        torch.testing.assert_close(logits[rows], peft_logits[rows], **TOLERANCE)
        expected = peft_gradients(peft_model, name)
        actual = our_gradients(model, name)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], **TOLERANCE, msg=key)


def test_loss_on_one_adapters_rows_leaves_others_without_gradient(tiny_base: BaseModel) -> None:
    model = multi_lora(tiny_base)
    with model.use_adapters(ROWS):
        logits = model(**batch(tiny_base)).logits
    logits[[0, 3]].logsumexp(-1).sum().backward()  # rows 0 and 3 belong to "math"
    assert any(torch.count_nonzero(p.grad) for p in model.adapter_parameters("math") if p.grad is not None)
    for other in ("chat", "code"):
        for parameter in model.adapter_parameters(other):
            assert parameter.grad is None or torch.count_nonzero(parameter.grad) == 0


def test_outside_use_adapters_the_model_is_the_base(tiny_base: BaseModel, tiny_model_dir: Path) -> None:
    plain = load_base_model(f"file://{tiny_model_dir}").model
    model = multi_lora(tiny_base)
    inputs = batch(tiny_base)
    torch.testing.assert_close(model(**inputs).logits, plain(**inputs).logits)


def test_use_adapters_nests_and_restores(tiny_base: BaseModel) -> None:
    model = multi_lora(tiny_base)
    inputs = {key: value[:1] for key, value in batch(tiny_base).items()}
    with model.use_adapters(["math"]):
        with_a = model(**inputs).logits
        with model.use_adapters(["chat"]):
            assert not torch.allclose(model(**inputs).logits, with_a)
        torch.testing.assert_close(model(**inputs).logits, with_a)
    assert model.routing is None
    with pytest.raises(KeyError, match="no adapters named \\['nope'\\]"):
        model.use_adapters(["nope"]).__enter__()


@pytest.mark.parametrize("path", ["loop", "batched"])
def test_mixed_generation_with_kv_cache_matches_peft(
    tiny_base: BaseModel, tiny_model_dir: Path, path: LoRAPath
) -> None:
    model = multi_lora(tiny_base)
    model.lora_path = path
    inputs = batch(tiny_base)
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tiny_base.tokenizer.pad_token_id}
    with model.use_adapters(ROWS), torch.no_grad():
        generated = model.model.generate(**inputs, **settings)

    peft_model = peft_twin(tiny_model_dir, model)
    for row, name in enumerate(ROWS):
        one = {key: value[row : row + 1] for key, value in inputs.items()}
        with torch.no_grad():
            if name is None:
                with peft_model.disable_adapter():
                    expected = peft_model.generate(**one, **settings)
            else:
                peft_model.set_adapter(name)
                expected = peft_model.generate(**one, **settings)
        # A row that emits EOS early stops there alone, but in the batch it is padded with
        # pad_token_id until every row is done: expect exactly that padding, nothing else.
        padding = [settings["pad_token_id"]] * (generated.shape[1] - expected.shape[1])
        assert generated[row].tolist() == expected[0].tolist() + padding, f"row {row} ({name})"


def test_same_seed_same_init_and_zero_adapter(tiny_base: BaseModel) -> None:
    model = MultiLoRAModel(tiny_base.model)
    model.add_adapter("one", CONFIGS["math"], seed=7)
    model.add_adapter("two", CONFIGS["math"], seed=7)
    model.add_adapter("three", CONFIGS["math"], seed=8)
    model.add_adapter("noop", CONFIGS["math"], zero=True)
    one, two, three = (model.adapter_parameters(name) for name in ("one", "two", "three"))
    assert all(torch.equal(x, y) for x, y in zip(one, two, strict=True))
    assert not torch.equal(one[0], three[0])
    assert all(torch.count_nonzero(p) == 0 for p in one[1::2])  # B starts at zero, as in PEFT
    assert all(torch.count_nonzero(p) == 0 for p in model.adapter_parameters("noop"))
    assert all(p.requires_grad and p.is_leaf and p.dtype == torch.float32 for p in one)


def test_registry_errors(tiny_base: BaseModel) -> None:
    model = multi_lora(tiny_base)
    with pytest.raises(ValueError, match=r"'qkv_proj' matches no linear layer.*available: \['down_proj'"):
        model.add_adapter("bad", AdapterConfig(rank=2, alpha=2, target_modules=("q_proj", "qkv_proj")))
    assert "bad" not in model.adapter_names()
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("math", CONFIGS["math"])
    with pytest.raises(ValueError, match="contain no '.'"):
        model.add_adapter("a.b", CONFIGS["math"])
    with pytest.raises(KeyError, match="no adapter named 'zzz'"):
        model.remove_adapter("zzz")
    assert model.adapter_names() == ["math", "chat", "code"]
    assert model.adapter_config("chat") == CONFIGS["chat"]


def test_remove_adapter_frees_parameters_and_optimizer_state(tiny_base: BaseModel) -> None:
    model = multi_lora(tiny_base)
    optimizer = torch.optim.AdamW(model.adapter_parameters("chat"), lr=1e-3)
    with model.use_adapters(ROWS):
        model(**batch(tiny_base)).logits.sum().backward()
    optimizer.step()
    watched = [weakref.ref(p) for p in model.adapter_parameters("chat")]
    watched += [weakref.ref(state["exp_avg"]) for state in optimizer.state.values()]
    parameter_count = len(list(model.parameters()))

    model.remove_adapter("chat")
    del optimizer
    gc.collect()
    assert all(ref() is None for ref in watched)
    assert len(list(model.parameters())) == parameter_count - 2 * 4  # two layers x (q, v) x (A, B)
    assert model.adapter_names() == ["math", "code"]
    with model.use_adapters(["math", "code"]):  # the rest still works
        model(**{key: value[:2] for key, value in batch(tiny_base).items()})


def test_saved_adapter_loads_in_peft_with_the_same_logits(
    tiny_base: BaseModel, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = multi_lora(tiny_base)
    model.save_adapter("chat", tmp_path / "chat", base_model_name_or_path="tiny-llama")
    assert {p.name for p in (tmp_path / "chat").iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }

    peft_model = PeftModel.from_pretrained(
        load_base_model(f"file://{tiny_model_dir}").model, tmp_path / "chat"
    )
    inputs = batch(tiny_base)
    with model.use_adapters(["chat"] * len(PROMPTS)), torch.no_grad():
        ours = model(**inputs).logits
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, ours, **TOLERANCE)


def test_load_adapter_round_trips(tiny_base: BaseModel, tiny_model_dir: Path, tmp_path: Path) -> None:
    model = multi_lora(tiny_base)
    for name in CONFIGS:
        model.save_adapter(name, tmp_path / name, base_model_name_or_path="tiny-llama")

    fresh = MultiLoRAModel(load_base_model(f"file://{tiny_model_dir}").model)
    all_suffixes = tuple(sorted(tiny_base.facts.linear_modules))
    for name, config in CONFIGS.items():
        loaded = fresh.load_adapter(f"{name}-copy", tmp_path / name)
        # "all-linear" is written out as the explicit suffixes, so it reads back as them.
        targets = all_suffixes if config.target_modules == "all-linear" else config.target_modules
        assert loaded == AdapterConfig(config.rank, config.alpha, config.dropout, targets)
        original, copy = model.adapter_state_dict(name), fresh.adapter_state_dict(f"{name}-copy")
        assert original.keys() == copy.keys()
        assert all(torch.equal(original[key], copy[key]) for key in original)


def test_load_adapter_state_dict_rejects_mismatches(tiny_base: BaseModel) -> None:
    model = multi_lora(tiny_base)
    state = model.adapter_state_dict("chat")
    with pytest.raises(ValueError, match="missing"):
        model.load_adapter_state_dict("math", state)
    before = model.adapter_state_dict("chat")
    state = {key: torch.zeros_like(value) for key, value in state.items()}
    state[list(state)[-1]] = torch.zeros(3, 3)  # only the last tensor is wrong
    with pytest.raises(ValueError, match="has shape \\(3, 3\\)"):
        model.load_adapter_state_dict("chat", state)
    after = model.adapter_state_dict("chat")
    assert all(torch.equal(before[key], after[key]) for key in before)  # nothing half-loaded


def test_wrapped_model_is_still_a_pretrained_model(tiny_base: BaseModel) -> None:
    model = MultiLoRAModel(tiny_base.model)
    assert isinstance(model.model, PreTrainedModel)
