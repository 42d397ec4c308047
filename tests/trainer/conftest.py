"""Fixtures for trainer tests: a tiny random Llama and its tokenizer, built offline in seconds."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from loraplex_trainer.model_host import BaseModel, load_base_model

# The tiny models gain nothing from intra-op threads, and threads spinning against the reward
# workers and agent threads on a 2-core machine made some tests up to 20x slower.
torch.set_num_threads(1)

SPECIAL_TOKENS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]

# ChatML, the template SmolLM2-Instruct uses, so tests see the same prompt shape as the real model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer over printable ASCII with ChatML special tokens."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One token per character; [\s\S] rather than "." so newlines are tokens too.
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, head_dim: int | None = None) -> LlamaForCausalLM:
    """Build a 2-layer Llama with random weights (seed 0) sized for the given tokenizer.

    ``head_dim`` (default hidden/heads = 16) for engines without a kernel for 16 (vLLM's CPU build).
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **({"head_dim": head_dim} if head_dim else {}),
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def save_tiny_model(directory: Path, head_dim: int | None = None) -> Path:
    """Save the tiny Llama and its tokenizer as a save_pretrained folder, loaded through the real path."""
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, head_dim).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A save_pretrained folder holding the tiny Llama and its tokenizer."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_base(tiny_model_dir: Path) -> BaseModel:
    """The tiny Llama loaded through the same path a trainer replica uses (file:// URI).

    Function-scoped: wrapping a model in MultiLoRAModel replaces its layers in place, so each
    test gets its own copy (loading it takes milliseconds).
    """
    return load_base_model(f"file://{tiny_model_dir}")
