"""Dataset rows of one experiment: loading and checking them, the eval split, prompts, and sampling order.

Rows come from exactly one source (``dataset.builtin``, ``inline``, ``file`` or ``configMap``)
and are checked once at load: each must be a JSON object holding ``promptField`` (a string,
or a list of chat messages) and ``answerField``. Any problem is a DatasetError naming the
field, the file and the line, which fails that one experiment.

Eval rows, in order of preference:
- ``eval``: a second source, loaded and checked like the first;
- ``evalFraction``: that share of the rows is held out (at least one row), chosen by a shuffle
  seeded by the builtin's ``seed`` (0 for other sources), so it never changes between runs;
- neither: a fixed sample of up to ``DEFAULT_EVAL_ROWS`` training rows. These rows are also
  trained on, so the eval reward then measures fit, not generalisation.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loraplex_api.experiment import DatasetSpec, DataSource

from .sources import config_map_text, resolve_file
from .tasks import generate

DEFAULT_EVAL_ROWS = 64

Row = dict[str, Any]


class DatasetError(ValueError):
    """The dataset cannot be read or a row is malformed; the message names the field, file and line."""


@dataclass(frozen=True)
class Splits:
    """Training rows and eval rows of one experiment."""

    train: list[Row]
    eval: list[Row]


class ChatTokenizer(Protocol):
    """The part of a Hugging Face tokenizer ``render_prompt`` uses."""

    chat_template: str | None

    def apply_chat_template(self, conversation: list[dict[str, str]], **kwargs: Any) -> Any:
        """Render a conversation with the model's template."""
        ...


def load_dataset(
    spec: DatasetSpec, *, base_dir: Path, config_maps: Mapping[tuple[str, str], str] | None = None
) -> Splits:
    """Load, check and split an experiment's rows.

    ``base_dir`` is where a relative ``file`` resolves (the manifest's folder standalone, the
    pool's storage in a cluster); ``config_maps`` maps (ConfigMap name, key) to its text and is
    filled by the cluster agent (without it a configMap source is a DatasetError).
    """
    train = _load_source(spec, spec, where="dataset", base_dir=base_dir, config_maps=config_maps)
    if spec.eval is not None:
        eval_rows = _load_source(
            spec.eval, spec, where="dataset.eval", base_dir=base_dir, config_maps=config_maps
        )
        return Splits(train=train, eval=eval_rows)
    split_seed = spec.builtin.seed if spec.builtin is not None else 0
    if spec.eval_fraction > 0:
        return _hold_out(train, spec.eval_fraction, split_seed)
    count = min(len(train), DEFAULT_EVAL_ROWS)
    picked = random.Random(f"eval-sample:{split_seed}").sample(range(len(train)), count)
    return Splits(train=train, eval=[train[i] for i in sorted(picked)])


def _hold_out(rows: list[Row], fraction: float, seed: int) -> Splits:
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise DatasetError(
            f"dataset.evalFraction: {fraction:g} of {len(rows)} rows leaves no training rows; "
            "add rows or set evalFraction: 0"
        )
    held = set(random.Random(f"eval-split:{seed}").sample(range(len(rows)), n_eval))
    return Splits(
        train=[row for i, row in enumerate(rows) if i not in held],
        eval=[row for i, row in enumerate(rows) if i in held],
    )


def _load_source(
    source: DataSource,
    spec: DatasetSpec,
    *,
    where: str,
    base_dir: Path,
    config_maps: Mapping[tuple[str, str], str] | None,
) -> list[Row]:
    located: Iterator[tuple[str, Any]]
    if source.builtin is not None:
        b = source.builtin
        rows = generate(b.name, b.size, b.seed, b.args, where=f"{where}.builtin", error=DatasetError)
        located = ((f"{where}.builtin {b.name} row {i}", row) for i, row in enumerate(rows))
        hint = "; builtin datasets use the fields 'prompt' and 'answer'"
        name = f"{where}.builtin"
    elif source.inline is not None:
        located = ((f"{where}.inline[{i}]", row) for i, row in enumerate(source.inline))
        hint, name = "", f"{where}.inline"
    elif source.file is not None:
        path = resolve_file(source.file, base_dir, where=where, error=DatasetError)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DatasetError(
                f"{where}.file: {source.file}: cannot be read as UTF-8 text: {error}"
            ) from None
        name = f"{where}.file: {source.file}"
        located = _jsonl(text, name)
        hint = ""
    else:
        assert source.config_map is not None  # the model guarantees exactly one source
        ref = source.config_map
        text = config_map_text(ref, config_maps, where=where, error=DatasetError)
        name = f"{where}.configMap {ref.name}/{ref.key}"
        located = _jsonl(text, name)
        hint = ""
    rows = [_checked(row, spec, location, hint) for location, row in located]
    if not rows:
        raise DatasetError(f"{name}: holds no rows")
    return rows


def _jsonl(text: str, name: str) -> Iterator[tuple[str, Any]]:
    """Parse JSON Lines, skipping blank lines; yields (location, value) with 1-based line numbers."""
    # split("\n"), not splitlines(): a JSON string may hold U+2028, which splitlines() would break on.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"{name} line {number}: not valid JSON ({error.msg} at column {error.colno})"
            ) from None
        except RecursionError:  # json's decoder recurses once per level of [ or {
            raise DatasetError(f"{name} line {number}: nested too deeply to be a dataset row") from None
        yield f"{name} line {number}", value


def _checked(row: Any, spec: DatasetSpec, location: str, hint: str) -> Row:
    if not isinstance(row, dict):
        raise DatasetError(f"{location}: expected a JSON object, got {type(row).__name__}")
    for field, setting in ((spec.prompt_field, "promptField"), (spec.answer_field, "answerField")):
        if field not in row:
            has = ", ".join(sorted(row)) or "no fields"
            raise DatasetError(f"{location}: row has no field {field!r} ({setting}; it has {has}){hint}")
    prompt = row[spec.prompt_field]
    if isinstance(prompt, list):
        for i, message in enumerate(prompt):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise DatasetError(
                    f"{location}: {spec.prompt_field}[{i}] is not a chat message "
                    '{"role": str, "content": str}'
                )
        if not prompt:
            raise DatasetError(f"{location}: {spec.prompt_field} is an empty list of chat messages")
    elif not isinstance(prompt, str):
        raise DatasetError(
            f"{location}: {spec.prompt_field} is {type(prompt).__name__}, "
            "expected a string or a list of chat messages"
        )
    return row


def answer_of(row: Row, spec: DatasetSpec) -> Any:
    """The row's reference answer (under ``answerField``)."""
    if spec.answer_field not in row:
        raise DatasetError(f"dataset: row has no field {spec.answer_field!r} (answerField)")
    return row[spec.answer_field]


def render_prompt(row: Row, spec: DatasetSpec, tokenizer: ChatTokenizer | None) -> str:
    """The text the model continues: the row's prompt, in the chat template when ``chatTemplate`` is set.

    With a chat template the conversation is ``[system?, user]`` (or the row's own message list,
    with ``systemPrompt`` put first unless the list already starts with a system message), ending
    in the assistant's turn. Without one, the prompt is used as-is, after ``systemPrompt`` and a
    blank line when set; a list of messages then is an error, as there is no way to render it.
    """
    prompt = row[spec.prompt_field]
    system = spec.system_prompt
    if not spec.chat_template:
        if isinstance(prompt, list):
            raise DatasetError(
                f"dataset.chatTemplate: {spec.prompt_field} holds chat messages, which need chatTemplate: true"
            )
        return f"{system}\n\n{prompt}" if system else prompt
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DatasetError(
            "dataset.chatTemplate: the base model's tokenizer has no chat template; set chatTemplate: false"
        )
    messages = list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # template errors are Jinja's own types (e.g. "system role not supported")
        raise DatasetError(f"dataset.chatTemplate: the tokenizer's chat template failed: {error}") from None
    return str(text)


class PromptSampler:
    """The order in which one experiment draws its training rows: a fresh shuffle every epoch.

    The order depends only on (n_rows, seed), and ``state_dict`` captures the position in it, so
    a resumed run continues exactly where the checkpointed one stopped.
    """

    def __init__(self, n_rows: int, seed: int) -> None:
        if n_rows < 1:
            raise ValueError("PromptSampler needs at least one row")
        self.n_rows = n_rows
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.n_rows))
        # A string seed is hashed the same way in every process (unlike hash()), so runs repeat.
        random.Random(f"prompt-order:{self.seed}:{epoch}").shuffle(order)
        return order

    def next_indices(self, k: int) -> list[int]:
        """The next ``k`` row indices, continuing into the next epoch's shuffle when this one runs out."""
        indices: list[int] = []
        while len(indices) < k:
            if self.position == self.n_rows:
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(k - len(indices), self.n_rows - self.position)
            indices.extend(self._order[self.position : self.position + take])
            self.position += take
        return indices

    def state_dict(self) -> dict[str, int]:
        """Where the sampler is, as plain JSON-able numbers for a checkpoint."""
        return {"n_rows": self.n_rows, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a checkpointed position; the rows and seed must be the ones it was taken with."""
        if state["n_rows"] != self.n_rows or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for {state['n_rows']} rows with seed {state['seed']}, "
                f"not {self.n_rows} rows with seed {self.seed}: the dataset or seed changed since the checkpoint"
            )
        if not 0 <= state["position"] <= self.n_rows or state["epoch"] < 0:
            raise ValueError(f"sampler state {dict(state)} is out of range")
        self.epoch = state["epoch"]
        self.position = state["position"]
        self._order = self._permutation(self.epoch)
