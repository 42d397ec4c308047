"""Cost of serving several LoRA adapters in one batch, side by side in one process.

On a real base model (SmolLM2-135M by default) with the quickstart's four adapters (ranks 8, 4,
16, 8 on different target modules), each measurement interleaved --repeats times, medians:

- training micro-batch, forward+backward of A adapters x R rows x T tokens: one mixed-adapter
  pass vs. A sequential single-adapter passes over the same rows, and vs. the base alone (with
  gradients to the input embeddings, so the backward runs through every layer just the same);
- decode step, A x R rows x 1 token: mixed vs. sequential vs. the base alone.

The base-alone ratio is the price of the multi-LoRA layers; mixed vs. sequential is what sharing
one batch buys. Then the two ways a layer can apply a mixed batch's adapters side by side, for 1,
4, 8 and 16 adapters (``--path-counts``): ``loop`` (a gather, two matmuls and a scatter per adapter)
and ``batched`` (adapters stacked, two batched matmuls): seconds of a decode step and of a training
pass, and the torch operations one forward runs (each a kernel launch on a GPU), which the batched
path keeps constant. Usage: ``python bench/bench_multilora.py [--repeats N] [--threads N] [--model URI]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from quickstart_adapters import add_quickstart_adapters
from torch.utils._python_dispatch import TorchDispatchMode

from loraplex_trainer.adapters import MultiLoRAModel
from loraplex_trainer.model_host import load_base_model


def train_pass(model: MultiLoRAModel, ids: torch.Tensor, rows: list[str | None], keep: int) -> None:
    """One training-shaped forward+backward: logits for the last ``keep`` positions, a scalar loss."""
    embeddings = model.model.get_input_embeddings()(ids).detach()
    # Without adapters nothing would need a gradient; asking for one at the input makes the base
    # alone run the same backward through every layer as an adapter's gradient does.
    embeddings.requires_grad_(rows.count(None) == len(rows))
    width = ids.shape[1]
    with model.use_adapters(rows):
        logits = model(inputs_embeds=embeddings, logits_to_keep=torch.arange(width - keep, width)).logits
        logits.float().logsumexp(-1).mean().backward()
    model.zero_grad(set_to_none=True)


@torch.inference_mode()
def decode_pass(model: MultiLoRAModel, ids: torch.Tensor, rows: list[str | None]) -> None:
    """One decode-shaped forward: one token per row, the last position's logits."""
    with model.use_adapters(rows):
        model(input_ids=ids, logits_to_keep=1)


def measure(arms: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each arm, the arms interleaved so that load changes hit all of them alike."""
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    for run in arms.values():  # warm-up: first-call allocations and lazy initialisation
        run()
    for _ in range(repeats):
        for arm, run in arms.items():
            started = time.perf_counter()
            run()
            seconds[arm].append(time.perf_counter() - started)
    return {arm: statistics.median(values) for arm, values in seconds.items()}


class OpCounter(TorchDispatchMode):
    """Counts the aten operations run under it: on a GPU, roughly its kernel launches."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_ops(run: Callable[[], None]) -> int:
    with OpCounter() as counter:
        run()
    return counter.count


def compare_paths(model: MultiLoRAModel, counts: list[int], rows: int, tokens: int, repeats: int) -> None:
    """Loop vs batched layers for each adapter count (adapters are added as the counts grow)."""
    names: list[str] = list(model.adapter_names())
    vocab = model.model.config.vocab_size
    print(f"loop vs batched layers: {rows} rows per adapter; training {tokens} tokens, decode 1 token")
    print(f"  {'adapters':>8} {'path':>8} {'decode ms':>10} {'ops/decode':>11} {'train ms':>10}")
    for count in counts:
        while len(names) < count:
            names += add_quickstart_adapters_from(model, len(names), count)
        mixed: list[str | None] = [name for name in names[:count] for _ in range(rows)]
        ids = torch.randint(0, vocab, (len(mixed), tokens), generator=torch.Generator().manual_seed(count))
        arms: dict[str, Callable[[], None]] = {}
        ops: dict[str, int] = {}
        for path in ("loop", "batched"):

            def decode(path: str = path, ids: torch.Tensor = ids, mixed: list[str | None] = mixed) -> None:
                model.lora_path = path  # type: ignore[assignment]
                model.eval()
                decode_pass(model, ids[:, :1], mixed)

            def train(path: str = path, ids: torch.Tensor = ids, mixed: list[str | None] = mixed) -> None:
                model.lora_path = path  # type: ignore[assignment]
                model.train()
                train_pass(model, ids, mixed, keep=tokens // 4)

            arms[f"{path} decode"], arms[f"{path} train"] = decode, train
            ops[path] = count_ops(decode)
        medians = measure(arms, repeats)
        for path in ("loop", "batched"):
            print(
                f"  {count:>8} {path:>8} {medians[f'{path} decode'] * 1000:>10.1f} {ops[path]:>11}"
                f" {medians[f'{path} train'] * 1000:>10.1f}"
            )
    model.lora_path = "auto"


def add_quickstart_adapters_from(model: MultiLoRAModel, start: int, stop: int) -> list[str]:
    """Adapters number start..stop-1, in the quickstart's shapes."""
    return add_quickstart_adapters(model, stop, first=start)


def report(title: str, medians: dict[str, float]) -> None:
    """Print each arm's median and its ratio to the mixed batch."""
    print(title)
    for arm, seconds in medians.items():
        print(f"  {arm:<34} {seconds * 1000:>9.1f} ms   {seconds / medians['mixed']:>5.2f} x mixed")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="builtin://smollm2-135m-instruct")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8, help="rows per adapter")
    parser.add_argument("--tokens", type=int, default=52, help="tokens per training row (prompt+completion)")
    parser.add_argument("--keep", type=int, default=13, help="positions whose logits the loss needs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--path-counts", default="1,4,8,16", help="adapter counts for loop vs batched")
    parser.add_argument("--path-rows", type=int, default=2, help="rows per adapter for loop vs batched")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    base = load_base_model(args.model)
    model = MultiLoRAModel(base.model)
    names = add_quickstart_adapters(model, args.adapters)
    model.train()
    n = args.adapters * args.rows
    mixed: list[str | None] = [name for name in names for _ in range(args.rows)]
    generator = torch.Generator().manual_seed(0)
    vocab = base.model.config.vocab_size
    ids = torch.randint(0, vocab, (n, args.tokens), generator=generator)
    blocks = [slice(a * args.rows, (a + 1) * args.rows) for a in range(args.adapters)]

    def sequential(run: Callable[[torch.Tensor, list[str | None]], None], x: torch.Tensor) -> None:
        for name, block in zip(names, blocks, strict=True):
            run(x[block], [name] * args.rows)

    print(
        f"{args.model}: {args.adapters} adapters x {args.rows} rows, threads={torch.get_num_threads()}, "
        f"repeats={args.repeats} (medians)"
    )
    keep = args.keep
    report(
        f"training micro-batch, forward+backward of {n} rows x {args.tokens} tokens",
        measure(
            {
                "mixed": lambda: train_pass(model, ids, mixed, keep),
                f"{args.adapters} sequential single-adapter": lambda: sequential(
                    lambda x, rows: train_pass(model, x, rows, keep), ids
                ),
                "base alone (grad to inputs)": lambda: train_pass(model, ids, [None] * n, keep),
            },
            args.repeats,
        ),
    )
    model.eval()
    step = ids[:, :1]
    report(
        f"decode step, {n} rows x 1 token",
        measure(
            {
                "mixed": lambda: decode_pass(model, step, mixed),
                f"{args.adapters} sequential single-adapter": lambda: sequential(
                    lambda x, rows: decode_pass(model, x, rows), step
                ),
                "base alone": lambda: decode_pass(model, step, [None] * n),
            },
            args.repeats * 5,
        ),
    )
    counts = [int(c) for c in args.path_counts.split(",") if c]
    fresh = MultiLoRAModel(load_base_model(args.model).model)
    compare_paths(fresh, counts, args.path_rows, args.tokens, args.repeats)


if __name__ == "__main__":
    main()
