"""Tracking diagnostic (DESIGN §5): how well each method's basis follows the activations it compresses.

At a few fixed optimizer steps (`points`: step 0 and `track_points - 1` more spread over the steps after the
memory window, so the diagnostic never runs inside it), on a held-out batch the suite names
(`suite.tracking_batch`, never a training batch), every basis is compared with

* the exact top-r eigenbasis U* of the current layer input's uncentred covariance C = XᵀX / N (the matrix
  OASIS's Oja rule and periodic PCA follow): `captured` = ‖XU‖²_F / ‖XU*‖²_F (1 = as good as the exact
  basis; U is orthonormalised first, so a Gaussian CompAct basis is judged by its span) and `angle`, the
  largest principal angle between span(U) and span(U*), in radians;
* its own initial basis U_0 (the one the first optimizer step used): `overlap_init` = ‖U_0ᵀU_t‖²_F / r, the
  net overlap (1 = the same subspace, r/d for an unrelated random one), not a sum of per-step angles.

Which bases: an optimizer that compresses activations exposes its trackers as `optimizer.trackers` (objects
with `.basis`, d_in × r, and `.rank`; the layers that read through one hold it as `module.tracker`), e.g.
`OasisAdamW` for oasis, its ablations, pca and compact. An optimizer that projects *gradients* exposes
`optimizer.gradient_projectors()` -> [(parameter, projector)] (galore, ldadam): a gradient projector is not a
basis of any layer input, so only `overlap_init` is measured for it (captured and angle are None).

Refreshes: an optimizer step hook counts the steps after which any basis or projector differs from the one
before (a new tensor or an in-place update), the first basis not counted: for a periodic method the number
of refreshes it performed inside the horizon.

Roles: q/k/v read the attention input (`qkv`), o_proj the attention output (`o`), gate/up the MLP input
(`gate_up`), down_proj the MLP's inner activation (`down`). The record keeps one row per (step, role), the
mean over that role's bases, and `mean` rows over all bases of a step.

Nothing here knows a method's name: what a method has is what it exposes. The step-0 snapshot of the
initial bases is kept as numpy arrays, outside torch, so a memory meter does not count the diagnostic.
"""

from __future__ import annotations

import math

import numpy as np
import torch

ROLES = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
         "up_proj": "gate_up", "down_proj": "down"}


def role_of(name: str) -> str:
    """The role of a layer (or parameter) name: the input it reads (`ROLES`), else its last name part."""
    parts = name.split(".")
    for part in reversed(parts):
        if part in ROLES:
            return ROLES[part]
    return parts[-1] if parts[-1] != "weight" or len(parts) < 2 else parts[-2]


def points(steps: int, window: int, n: int) -> list[int]:
    """Up to `n` steps at which to measure: 0, then n-1 spread evenly from the first step after the memory
    window to the last step, both included."""
    if n <= 0:
        return []
    first, last = min(window + 1, steps - 1), steps - 1
    if n == 1:
        rest = set()
    elif n == 2:
        rest = {last}
    else:
        rest = {round(first + (last - first) * i / (n - 2)) for i in range(n - 1)}
    return sorted({0} | rest)


def orthonormal(u: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(u.double())[0]


def subspace_scores(x: torch.Tensor, u: torch.Tensor) -> tuple[float, float]:
    """(captured-variance ratio ‖XU‖²/‖XU*‖², largest principal angle to U*) of the span of `u` (d × r) on
    inputs `x` (N × d), U* the top-r eigenbasis of XᵀX, in float64."""
    x, q = x.double(), orthonormal(u)
    gram = x.T @ x
    evals, evecs = torch.linalg.eigh(gram)
    r = q.shape[1]
    best = evals[-r:].clamp_min(0).sum()
    captured = float((x @ q).square().sum() / best) if best > 0 else math.nan
    cos = torch.linalg.svdvals(evecs[:, -r:].T @ q).min().clamp(-1.0, 1.0)
    return captured, float(torch.arccos(cos))


def overlap(u0, u) -> float:
    """‖Q_0ᵀQ_t‖²_F / r of the orthonormalised spans (numpy or torch, d × r)."""
    q0, q = orthonormal(torch.as_tensor(u0)), orthonormal(torch.as_tensor(u))
    return float((q0.T @ q).square().sum() / q.shape[1])


def _tall(p: torch.Tensor) -> torch.Tensor:
    """A projector as d × r (GaLore keeps r × n for a right projection)."""
    return p if p.shape[0] >= p.shape[1] else p.T


class Tracking:
    """Measure the bases a method exposes at `points`; `result()` is the record's `subspace` additions."""

    def __init__(self, model, optimizer, batch: dict | None, step_points: list[int], device: str):
        self.model, self.optimizer, self.batch = model, optimizer, batch
        self.points, self.device = set(step_points), device
        self.rows: list[dict] = []
        self.initial: dict[int, np.ndarray] = {}  # id(basis owner) -> U_0
        self.fingerprints: dict[int, tuple] = {}
        self.refreshes = 0
        self.exposed = callable(getattr(optimizer, "gradient_projectors", None)) or \
            getattr(optimizer, "trackers", None) is not None
        if self.exposed:
            optimizer.register_step_pre_hook(lambda *_: self._snapshot())
            optimizer.register_step_post_hook(lambda *_: self._after_step())

    # --- what a method exposes: (key, name, basis d×r, is_activation_basis) -----------------------------
    def _bases(self):
        names = {id(p): n for n, p in self.model.named_parameters()}
        for tracker in getattr(self.optimizer, "trackers", None) or []:
            if tracker.basis is not None:
                yield id(tracker), tracker, tracker.basis, True
        if callable(getattr(self.optimizer, "gradient_projectors", None)):
            for param, projector in self.optimizer.gradient_projectors():
                yield id(param), names.get(id(param), "?"), projector, False

    def _snapshot(self) -> None:
        for key, _, basis, _ in self._bases():
            if key not in self.initial:
                self.initial[key] = _tall(basis.detach()).double().cpu().numpy().copy()
                self.fingerprints[key] = (id(basis), basis._version)

    def _after_step(self) -> None:
        self._snapshot()  # gradient projectors exist only after the first step
        changed = False
        for key, _, basis, _ in self._bases():
            mark = (id(basis), basis._version)  # the tensor a method holds: a new one or one written in place
            changed |= key in self.fingerprints and self.fingerprints[key] != mark
            self.fingerprints[key] = mark
        self.refreshes += changed

    # --- the diagnostic -----------------------------------------------------------------------------------
    def maybe_measure(self, step: int) -> None:
        if self.exposed and step in self.points:
            self.measure(step)

    @torch.no_grad()
    def measure(self, step: int) -> None:
        bases = list(self._bases())
        inputs = self._layer_inputs([owner for _, owner, _, act in bases if act])
        per_role: dict[str, list[tuple]] = {}
        for key, owner, basis, is_activation in bases:
            u = _tall(basis.detach()).cpu()
            captured = angle = None
            if is_activation:
                layer_name, x = inputs[id(owner)]
                captured, angle = subspace_scores(x, u)
                role = role_of(layer_name)
            else:
                role = role_of(owner)
            init = self.initial.get(key)
            score = (captured, angle, overlap(init, u) if init is not None else None)
            per_role.setdefault(role, []).append(score)
        for role, scores in sorted(per_role.items()):
            self.rows.append({"step": step, "role": role, **_mean(scores)})
        everything = [s for scores in per_role.values() for s in scores]
        if everything:
            self.rows.append({"step": step, "role": "mean", **_mean(everything)})

    def _layer_inputs(self, trackers) -> dict[int, tuple[str, torch.Tensor]]:
        """id(tracker) -> (name of the first layer reading through it, its input on the held-out batch)."""
        if not trackers or self.batch is None:
            return {}
        wanted = {id(t) for t in trackers}
        found: dict[int, tuple[str, torch.Tensor]] = {}
        handles = []
        def capture(name: str, key: int):
            def hook(module, args):
                if key not in found:
                    found[key] = (name, args[0].reshape(-1, args[0].shape[-1]).detach().float().cpu())
            return hook

        for name, module in self.model.named_modules():
            tracker = getattr(module, "tracker", None)
            if tracker is not None and id(tracker) in wanted:
                handles.append(module.register_forward_pre_hook(capture(name, id(tracker))))
        was_training = self.model.training
        self.model.eval()
        try:
            keys = ("input_ids", "attention_mask")
            batch = {k: v.to(self.device) for k, v in self.batch.items() if k in keys}
            self.model(**batch)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        mask = self.batch["attention_mask"].reshape(-1).bool()  # padding rows carry no activation
        return {k: (n, x[mask]) for k, (n, x) in found.items()}

    def result(self) -> dict:
        if not self.exposed:
            return {}
        return {"refreshes": self.refreshes, "tracking": self.rows}


def _mean(scores: list[tuple]) -> dict:
    out = {}
    for i, key in enumerate(("captured", "angle", "overlap_init")):
        values = [s[i] for s in scores if s[i] is not None and not math.isnan(s[i])]
        out[key] = sum(values) / len(values) if values else None
    return out
