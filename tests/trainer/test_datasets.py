"""Loading, checking and splitting dataset rows; prompt rendering; the resumable prompt order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loraplex_api.experiment import DatasetSpec
from loraplex_trainer.datasets import (
    DEFAULT_EVAL_ROWS,
    DatasetError,
    PromptSampler,
    answer_of,
    load_dataset,
    render_prompt,
)
from loraplex_trainer.model_host import BaseModel

ROWS = [{"question": f"What is {i} + 1?", "solution": str(i + 1)} for i in range(10)]


def dataset(**fields: Any) -> DatasetSpec:
    return DatasetSpec.model_validate(fields)


def write_jsonl(path: Path, rows: list[Any], blank_lines: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")
    return path


def test_file_relative_to_base_dir_with_field_names(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS, blank_lines=True)
    spec = dataset(file="data/train.jsonl", promptField="question", answerField="solution")
    splits = load_dataset(spec, base_dir=tmp_path)
    assert splits.train == ROWS
    assert answer_of(splits.train[3], spec) == "4"
    assert render_prompt(splits.train[3], spec, None) == "What is 3 + 1?"


def test_file_lines_are_split_on_newlines_only(tmp_path: Path) -> None:
    rows = [{"prompt": "a\u2028b\x0cc", "answer": "x"}, {"prompt": "d", "answer": "y"}]
    path = tmp_path / "train.jsonl"
    path.write_text("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    assert load_dataset(dataset(file=str(path)), base_dir=Path("/elsewhere")).train == rows


def test_inline_rows() -> None:
    splits = load_dataset(dataset(inline=[{"prompt": "hi", "answer": 1}]), base_dir=Path("."))
    assert splits.train == [{"prompt": "hi", "answer": 1}]
    assert splits.eval == splits.train


def test_config_map_rows() -> None:
    spec = dataset(
        configMap={"name": "rows", "key": "train.jsonl"}, promptField="question", answerField="solution"
    )
    text = "\n".join(json.dumps(r) for r in ROWS)
    assert load_dataset(spec, base_dir=Path("."), config_maps={("rows", "train.jsonl"): text}).train == ROWS
    with pytest.raises(DatasetError, match=r"dataset\.configMap: rows/train\.jsonl cannot be read here"):
        load_dataset(spec, base_dir=Path("."))
    with pytest.raises(DatasetError, match="ConfigMap rows has no key 'train.jsonl'"):
        load_dataset(spec, base_dir=Path("."), config_maps={})


def test_builtin_rows_follow_the_seed() -> None:
    def train(seed: int) -> list[dict]:
        spec = dataset(builtin={"name": "arithmetic", "size": 50, "seed": seed})
        return load_dataset(spec, base_dir=Path(".")).train

    assert len(train(1)) == 50 and train(1) == train(1) and train(1) != train(2)


def test_builtin_with_other_field_names_says_which_fields_it_has() -> None:
    spec = dataset(builtin={"name": "arithmetic", "size": 5}, promptField="question")
    with pytest.raises(
        DatasetError, match=r"row 0: row has no field 'question' \(promptField.*use the fields 'prompt'"
    ):
        load_dataset(spec, base_dir=Path("."))


def test_eval_fraction_is_a_deterministic_partition() -> None:
    spec = dataset(builtin={"name": "sort_numbers", "size": 100, "seed": 3}, evalFraction=0.2)
    first, again = load_dataset(spec, base_dir=Path(".")), load_dataset(spec, base_dir=Path("."))
    assert first == again
    assert len(first.eval) == 20 and len(first.train) == 80
    everything = load_dataset(
        dataset(builtin={"name": "sort_numbers", "size": 100, "seed": 3}), base_dir=Path(".")
    )
    assert sorted(map(json.dumps, first.train + first.eval)) == sorted(map(json.dumps, everything.train))


def test_eval_fraction_keeps_a_training_row() -> None:
    with pytest.raises(DatasetError, match=r"dataset\.evalFraction: 0\.5 of 1 rows leaves no training rows"):
        load_dataset(dataset(inline=[{"prompt": "a", "answer": "b"}], evalFraction=0.5), base_dir=Path("."))


def test_separate_eval_source(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "held out", "answer": "x"}])
    spec = dataset(builtin={"name": "count_letters", "size": 10}, eval={"file": "eval.jsonl"})
    splits = load_dataset(spec, base_dir=tmp_path)
    assert len(splits.train) == 10 and splits.eval == [{"prompt": "held out", "answer": "x"}]


def test_default_eval_is_a_fixed_sample_of_train() -> None:
    spec = dataset(builtin={"name": "arithmetic", "size": 500})
    splits = load_dataset(spec, base_dir=Path("."))
    assert len(splits.eval) == DEFAULT_EVAL_ROWS
    assert all(row in splits.train for row in splits.eval)
    assert splits.eval == load_dataset(spec, base_dir=Path(".")).eval


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"prompt": "a", "answer": "b"}\n\n{"prompt": "c", "answer": \n',
            r"^dataset\.file: data/train\.jsonl line 3: not valid JSON \(Expecting value at column 27\)$",
        ),
        (
            '["prompt", "answer"]\n',
            r"^dataset\.file: data/train\.jsonl line 1: expected a JSON object, got list$",
        ),
        (
            '{"prompt": "a", "answer": "b"}\n{"prompt": "c", "solution": "d"}\n',
            r"^dataset\.file: data/train\.jsonl line 2: row has no field 'answer' \(answerField; it has prompt, solution\)$",
        ),
        (
            '{"prompt": 3, "answer": "b"}\n',
            r"line 1: prompt is int, expected a string or a list of chat messages",
        ),
        ('{"prompt": [{"role": "user"}], "answer": "b"}\n', r"line 1: prompt\[0\] is not a chat message"),
        ("\n\n", r"^dataset\.file: data/train\.jsonl: holds no rows$"),
        (
            '{"prompt": "a", "answer": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n",
            r"^dataset\.file: data/train\.jsonl line 2: nested too deeply to be a dataset row$",
        ),
    ],
)
def test_bad_files_name_file_line_and_field(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(dataset(file="data/train.jsonl"), base_dir=tmp_path)


def test_missing_file_and_bad_inline_row(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"^dataset\.file: nope\.jsonl: no such file"):
        load_dataset(dataset(file="nope.jsonl"), base_dir=tmp_path)
    with pytest.raises(DatasetError, match=r"^dataset\.eval\.inline\[1\]: row has no field 'prompt'"):
        spec = dataset(
            inline=[{"prompt": "a", "answer": "b"}],
            eval={"inline": [{"prompt": "a", "answer": "b"}, {"answer": "c"}]},
        )
        load_dataset(spec, base_dir=tmp_path)


def test_render_prompt_with_chat_template(tiny_base: BaseModel) -> None:
    tokenizer = tiny_base.tokenizer
    row = {"prompt": "What is 2 + 2?", "answer": "4"}
    plain = dataset(inline=[row], chatTemplate=True)
    assert render_prompt(row, plain, tokenizer) == (
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_system = dataset(inline=[row], chatTemplate=True, systemPrompt="Be brief.")
    assert render_prompt(row, with_system, tokenizer) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_prompt_from_chat_messages(tiny_base: BaseModel) -> None:
    messages = [
        {"role": "system", "content": "Own system."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2 + 2?"},
    ]
    row = {"prompt": messages, "answer": "4"}
    spec = dataset(inline=[row], chatTemplate=True, systemPrompt="Ignored: the row has its own.")
    text = render_prompt(row, spec, tiny_base.tokenizer)
    assert text.startswith("<|im_start|>system\nOwn system.<|im_end|>\n<|im_start|>user\nHi")
    assert text.endswith("<|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(DatasetError, match="holds chat messages, which need chatTemplate: true"):
        render_prompt(row, dataset(inline=[row]), tiny_base.tokenizer)


def test_render_prompt_without_chat_template() -> None:
    row = {"prompt": "What is 2 + 2?", "answer": "4"}
    assert (
        render_prompt(row, dataset(inline=[row], systemPrompt="Be brief."), None)
        == "Be brief.\n\nWhat is 2 + 2?"
    )
    with pytest.raises(DatasetError, match="tokenizer has no chat template"):
        render_prompt(row, dataset(inline=[row], chatTemplate=True), None)


def test_sampler_covers_each_epoch_once_and_reshuffles() -> None:
    sampler = PromptSampler(10, seed=1)
    first, second = sampler.next_indices(10), sampler.next_indices(10)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second
    assert PromptSampler(10, seed=1).next_indices(20) == first + second
    assert PromptSampler(10, seed=2).next_indices(10) != first


def test_sampler_state_round_trip_continues_the_same_sequence() -> None:
    original = PromptSampler(7, seed=5)
    original.next_indices(12)  # mid second epoch
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON checkpoint
    expected = original.next_indices(30)
    resumed = PromptSampler(7, seed=5)
    resumed.load_state_dict(state)
    assert resumed.next_indices(30) == expected
    with pytest.raises(ValueError, match="the dataset or seed changed"):
        PromptSampler(8, seed=5).load_state_dict(state)
