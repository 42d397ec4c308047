"""Packing rows into batches under a budget of padded token positions.

Rollout batches and training micro-batches have the same shape: every row is a left-padded
prompt followed by a right-padded tail (new tokens to generate, or a completion to score), so a
batch of n rows costs n x (longest prompt + longest tail) positions of KV cache and activations.
The rollout engine and the training pass both split their rows with :func:`pack`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


def pack(
    order: Sequence[int],
    sizes: Sequence[tuple[int, int]],
    limit: int | None,
    *,
    max_padding: float | None = None,
) -> Iterator[list[int]]:
    """Split the rows in ``order`` into consecutive batches of at most ``limit`` padded positions.

    ``sizes[i]`` is row i's (prompt length, tail length). A row larger than ``limit`` on its own
    still gets a batch, alone; ``limit=None`` puts every row in one batch. With ``max_padding``, a
    batch also ends before a row whose longer tail would make the batch's padded tail positions
    exceed its rows' own by more than that fraction (rows should then come sorted by tail length).
    """
    batch: list[int] = []
    longest_prompt = longest_tail = tails = 0
    for i in order:
        prompt, tail = sizes[i]
        prompt, tail = max(longest_prompt, prompt), max(longest_tail, tail)
        padded = (len(batch) + 1) * tail
        too_big = limit is not None and (len(batch) + 1) * (prompt + tail) > limit
        too_padded = max_padding is not None and padded > (1 + max_padding) * (tails + sizes[i][1])
        if batch and (too_big or too_padded):
            yield batch
            batch, tails = [], 0
            prompt, tail = sizes[i]
        batch.append(i)
        tails += sizes[i][1]
        longest_prompt, longest_tail = prompt, tail
    if batch:
        yield batch
