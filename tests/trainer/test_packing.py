"""Packing rows into batches: the position budget, and the padding bound of training micro-batches."""

from __future__ import annotations

from loraplex_trainer.packing import pack


def test_batches_stay_within_the_padded_position_budget() -> None:
    sizes = [(10, 2)] * 5 + [(30, 2)]
    # 3 rows x (10 + 2) = 36 <= 40; a fourth would be 48. The long prompt widens its batch.
    assert list(pack(range(6), sizes, 40)) == [[0, 1, 2], [3, 4], [5]]
    assert list(pack(range(6), sizes, None)) == [[0, 1, 2, 3, 4, 5]]


def test_a_batch_ends_where_longer_tails_would_make_it_mostly_padding() -> None:
    # Short answers (2 tokens, four rows of one group) then long ones (12): together, 75% of the
    # tail positions would be padding; apart, none is.
    sizes = [(5, 2)] * 4 + [(5, 12)] * 4
    assert list(pack(range(8), sizes, None)) == [list(range(8))]
    assert list(pack(range(8), sizes, None, max_padding=0.25)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # One step up: 4 x 3 = 12 padded positions for 9 real ones, 33% more: split at 25%, kept at 50%.
    near = [(5, 2)] * 3 + [(5, 3)]
    assert list(pack(range(4), near, None, max_padding=0.25)) == [[0, 1, 2], [3]]
    assert list(pack(range(4), near, None, max_padding=0.5)) == [[0, 1, 2, 3]]
