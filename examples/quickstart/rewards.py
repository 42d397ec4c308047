"""A user reward for the sort_numbers task, loaded by `reward.python` in a separate worker process.

The trainer calls ``sorted_prefix(prompt, completion, row)`` for every sample and expects a float.
"""

import re


def sorted_prefix(prompt: str, completion: str, row: dict) -> float:
    """Partial credit: the share of the expected list the completion gets right, in order, from the start."""
    expected = [int(x) for x in re.findall(r"\d+", str(row["answer"]))]
    got = [int(x) for x in re.findall(r"\d+", completion)]
    right = 0
    for want, have in zip(expected, got):
        if want != have:
            break
        right += 1
    bonus = 0.2 if got == expected else 0.0  # nothing extra after the list
    return right / len(expected) * 0.8 + bonus
