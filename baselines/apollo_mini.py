"""APOLLO-Mini from `apollo-torch`: APOLLO (`baselines/apollo.py`) with a rank-1 auxiliary space and
tensor-wise gradient scaling, scale 128 (the package README and its LLaMA-1B/7B/13B pretraining scripts;
the 60M/130M scripts also set `scale_front`, available here as a key). The registry pins `aux_rank=1` and
`scale_type="tensor"`; the suite's `rank` is not used.

Optimizer state per low-rank weight W (m × n): exp_avg and exp_avg_sq of the rank-1 projected gradient
2·max(m, n), the projection min(m, n), the limiter's last norm 1: 3 numbers per row or column, against
AdamW's 2·m·n. Every other parameter keeps AdamW's two moments.
"""

from __future__ import annotations

from baselines.apollo import build_apollo

DEFAULTS = {"aux_rank": 1, "proj": "random", "scale_type": "tensor", "scale": 128.0, "update_proj_gap": 200,
            "proj_type": "std", "scale_front": False, "eps": 1e-6, "layerwise": False}


def build(model, cfg):
    return build_apollo(model, cfg, cfg["aux_rank"])
