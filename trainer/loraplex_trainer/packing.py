"""Packing rows into batches under a budget of padded token positions.

Rollout batches and training micro-batches have the same shape: every row is a left-padded
prompt followed by a right-padded tail (new tokens to generate, or a completion to score), so a
batch of n rows costs n x (longest prompt + longest tail) positions of KV cache and activations.
The rollout engine and the training pass both split their rows with :func:`pack`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def pack(order: Sequence[int], sizes: Sequence[tuple[int, int]], limit: int | None) -> Iterator[list[int]]:
    """Split the rows in ``order`` into consecutive batches of at most ``limit`` padded positions.

    ``sizes[i]`` is row i's (prompt length, tail length). A row larger than ``limit`` on its own
    still gets a batch, alone; ``limit=None`` puts every row in one batch.
    """
    batch: list[int] = []
    longest_prompt = longest_tail = 0
    for i in order:
        prompt, tail = sizes[i]
        prompt, tail = max(longest_prompt, prompt), max(longest_tail, tail)
        if batch and limit is not None and (len(batch) + 1) * (prompt + tail) > limit:
            yield batch
            batch = []
            prompt, tail = sizes[i]
        batch.append(i)
        longest_prompt, longest_tail = prompt, tail
    if batch:
        yield batch
