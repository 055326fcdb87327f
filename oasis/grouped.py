"""The batched pieces of `OasisAdamW.step()`: a handful of ops per step instead of a dozen per layer, and no
value read back to the host.

* Adam moments: `torch._foreach_*` over the lists of moments, gradients and (uncompressed) parameters, the
  same elementwise ops in the same order as the per-tensor code (and, for the uncompressed parameters, as
  `torch.optim.AdamW(foreach=True)`).
* The compressed layers' lifted update W ← W − s·Δ Uᵀ stays one in-place GEMM per layer (the weights are
  the model's own tensors); the casts it needs are batched: one copy of all directions into the weights'
  dtype, one cast of all bases of one input size.
* Basis moves: trackers of the exact class `OjaTracker` with equal shape, device and `oja_settings()` are
  stacked and moved by one batched `oja_step` and one batched Cholesky-QR2; any other tracker moves alone
  (`tracker.advance()`).
* Moment transport: layers with equal moment shape and step are stacked with their rotations and
  transported by one batched `transport_moments`.
Under FSDP2 every list holds this rank's shards (`local`), so all of it is row-local as before.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import Tensor

from .subspace import OjaTracker, oja_step, orthonormalize_cholesky


def _by(items, key) -> dict:
    groups = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return groups


def adam_moments(states: list[dict], grads: list[Tensor], group: dict, local) -> list[tuple]:
    """Adam's moment update for the parameters of `states` (lazily zero-initialised, `step` counted), in
    place with foreach ops; returns, per distinct step count, (indices, denominators, step size) with
    denominator = √v / √(1 − β2ᵗ) + ε and step size lr / (1 − β1ᵗ)."""
    beta1, beta2 = group["betas"]
    for st, g in zip(states, grads):
        if "step" not in st:  # shaped like the gradient: a DTensor like it under FSDP2
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(g)
            st["exp_avg_sq"] = torch.zeros_like(g)
        st["step"] += 1
    out = []
    for step, idx in _by(range(len(states)), lambda i: states[i]["step"]).items():
        m = [local(states[i]["exp_avg"]) for i in idx]
        v = [local(states[i]["exp_avg_sq"]) for i in idx]
        g = [local(grads[i]) for i in idx]
        torch._foreach_lerp_(m, g, 1 - beta1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - beta2**step))
        torch._foreach_add_(denom, group["eps"])
        out.append((idx, m, denom, group["lr"] / (1 - beta1**step)))
    return out


def adamw_step(params: list[Tensor], states: list[dict], group: dict, local) -> None:
    """AdamW on full parameters, as `torch.optim.AdamW(foreach=True)` computes it."""
    grads = [p.grad for p in params]
    for idx, m, denom, step_size in adam_moments(states, grads, group, local):
        ps = [local(params[i]) for i in idx]
        if group["weight_decay"] != 0:
            torch._foreach_mul_(ps, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_addcdiv_(ps, m, denom, value=-step_size)


def compressed_step(layers: list, states: list[dict], group: dict, local) -> None:
    """The Adam update of compressed layers, lifted through their bases: W ← W(1 − lr·wd) − s·Δ Uᵀ."""
    grads = [layer.grad_carrier.grad for layer in layers]
    for idx, m, denom, step_size in adam_moments(states, grads, group, local):
        directions = torch._foreach_div(m, denom)
        del denom
        weights = [local(layers[i].weight) for i in idx]
        if group["weight_decay"] != 0:
            torch._foreach_mul_(weights, 1 - group["lr"] * group["weight_decay"])
        directions = _in_dtypes(directions, [w.dtype for w in weights])
        bases = _bases_in(layers, idx, weights)
        for i, w, d in zip(idx, weights, directions):
            # in-place GEMM: the lifted d_out × d_in update is never materialised
            w.addmm_(d, bases[i].T, alpha=-step_size * layers[i].tracker.scale)


def _in_dtypes(tensors: list[Tensor], dtypes: list[torch.dtype]) -> list[Tensor]:
    """`tensors[i].to(dtypes[i])`, with one flat buffer and one foreach copy per (source, target) dtype."""
    out = list(tensors)
    for (src, dst), idx in _by(range(len(tensors)), lambda i: (tensors[i].dtype, dtypes[i])).items():
        if src == dst:
            continue
        flat = torch.empty(sum(tensors[i].numel() for i in idx), dtype=dst, device=tensors[idx[0]].device)
        views, offset = [], 0
        for i in idx:
            views.append(flat[offset:offset + tensors[i].numel()].view(tensors[i].shape))
            offset += tensors[i].numel()
        torch._foreach_copy_(views, [tensors[i] for i in idx])
        for i, view in zip(idx, views):
            out[i] = view
    return out


def _bases_in(layers: list, idx: list[int], weights: list[Tensor]) -> dict[int, Tensor]:
    """Each layer's basis in its weight's dtype: one stacked cast per (input size, rank, dtype)."""
    need = {}  # (tracker id, dtype) -> tracker
    for i, w in zip(idx, weights):
        need[(id(layers[i].tracker), w.dtype)] = layers[i].tracker
    cast = {}
    key = lambda k: (tuple(need[k].basis.shape), need[k].basis.dtype, k[1], need[k].basis.device)  # noqa: E731
    for (_, src, dst, _), keys in _by(need, key).items():
        if src == dst:
            cast.update({k: need[k].basis for k in keys})
            continue
        stacked = torch.stack([need[k].basis for k in keys]).to(dst)
        cast.update(zip(keys, stacked.unbind(0)))
    return {i: cast[(id(layers[i].tracker), w.dtype)] for i, w in zip(idx, weights)}


def _oja_key(tracker):
    if type(tracker) is not OjaTracker:  # a subclass may move otherwise: alone
        return None
    if tracker.normalization == "centred":  # needs its own mean statistic: moves alone (`_next_basis`)
        return None
    settings = tuple(sorted(tracker.oja_settings().items()))
    return (tracker.d_in, tracker.rank, tracker.basis.dtype, tracker.basis.device, settings)


def advance(trackers: list) -> dict[int, Tensor]:
    """Move the bases of `trackers` (all due at this step, statistics reduced); returns tracker id →
    rotation U_newᵀ U_old for those that report one."""
    rotations = {}
    groups = _by([t for t in trackers if t.basis is not None], _oja_key)
    for key, group in groups.items():
        if key is None or len(group) == 1:
            for tracker in group:
                rotation = tracker.advance()
                if rotation is not None:
                    rotations[id(tracker)] = rotation
            continue
        old = torch.stack([t.basis for t in group])
        s = torch.stack([t.stats[0] for t in group])
        k = torch.stack([t.stats[1] for t in group])
        # no rows seen: S = K = 0, a zero step; the count divides in the statistics' dtype, as per tracker
        count = torch.stack([t.stats[2] for t in group]).clamp_min(1).to(s.dtype)[:, None, None]
        new = orthonormalize_cholesky(oja_step(old, s / count, k / count, **group[0].oja_settings()))
        rotation = new.mT @ old
        torch._foreach_copy_([t.basis for t in group], list(new.unbind(0)))
        for tracker, r in zip(group, rotation.unbind(0)):
            tracker.book_move(r)
            tracker.stats = None
            rotations[id(tracker)] = r
    return rotations


def transport(layers: list, states: list[dict], rotations: list[Tensor], betas, local, transport_moments):
    """Carry the moments of `layers` (each with the rotation of its basis) into the new coordinates, in
    place: one batched `transport_moments` per (moment shape, dtype, step)."""
    todo = [i for i, st in enumerate(states) if st.get("step", 0) > 0]
    key = lambda i: (tuple(local(states[i]["exp_avg"]).shape), local(states[i]["exp_avg"]).dtype,  # noqa: E731
                     states[i]["step"])
    for (_, _, step), idx in _by(todo, key).items():
        m = [local(states[i]["exp_avg"]) for i in idx]
        v = [local(states[i]["exp_avg_sq"]) for i in idx]
        r = torch.stack([rotations[i] for i in idx])
        new_m, new_v = transport_moments(torch.stack(m), torch.stack(v), r, step, betas)
        torch._foreach_copy_(m, list(new_m.unbind(0)))
        torch._foreach_copy_(v, list(new_v.unbind(0)))
