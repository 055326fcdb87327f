"""Choosing a method's learning rate (study v2, issue 20): on the validation split, never on the reported
numbers. `val_loss` is the c4 suite's loss on the slice of the Wikipedia validation file after the
`eval_loss` tokens (suites/evaluate/tasks/c4.py), disjoint from training and from every reported metric.
The rate with the lowest mean `val_loss` over its ok runs wins; ties go to the smaller rate. A winner at an
edge of the rates tried is no optimum, so the grid grows past it by one factor of 2 (`beyond_the_edge`) up to
MAX_EXTENSIONS times. suites.study runs the
main rows at that rate and reports.load picks the same row for the main table, through this one rule.
"""

from __future__ import annotations

import math
import statistics

METRIC = "val_loss"


def best_rate(val_losses: dict[float, list[float]]) -> float | None:
    """The rate with the lowest mean validation loss among rates with at least one finite value."""
    scored = {lr: statistics.fmean(v) for lr, v in val_losses.items()
              if v and all(math.isfinite(x) for x in v)}
    if not scored:
        return None
    return min(scored, key=lambda lr: (scored[lr], lr))


EDGE_FACTOR = 2.0
MAX_EXTENSIONS = 2  # rates added past the profile's grid per method (each one run of the study's budget)


def beyond_the_edge(val_losses: dict[float, list[float]], extensions: int) -> float | None:
    """The next rate to try when the best of `val_losses` is the smallest or largest rate tried (its half or
    its double); None when the best is inside the grid, when `extensions` rates were already added
    (MAX_EXTENSIONS), or when nothing has a finite value."""
    best = best_rate(val_losses)
    if best is None or extensions >= MAX_EXTENSIONS or len(val_losses) < 2:
        return None
    if best == min(val_losses):
        return best / EDGE_FACTOR
    if best == max(val_losses):
        return best * EDGE_FACTOR
    return None
