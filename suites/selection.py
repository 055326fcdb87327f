"""Choosing a method's learning rate (study v2, issue 20): on the validation split, never on the reported
numbers. `val_loss` is the c4 suite's loss on the slice of the Wikipedia validation file after the
`eval_loss` tokens (suites/tasks/c4.py), disjoint from training and from every reported metric. The rate
with the lowest mean `val_loss` over its ok runs wins; ties go to the smaller rate. suites.study runs the
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
