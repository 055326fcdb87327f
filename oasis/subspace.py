"""Bases for the input activations of compressed linear layers.

A tracker owns one orthonormal basis U (d_in × r, float32) of the activation space of one layer — or of a
group of layers that read the same input. The compressed layer asks it for U in forward, hands it the live
activations X once per optimizer step, and the optimizer reads back how the basis moved (R = U_newᵀ U_old,
r × r) to transport its moments into the new coordinates.

Timing: a basis moves at most once per optimizer step, on the first forward after `step()`. Every
micro-batch of a step is then projected on the same U, so the accumulated low-rank gradient is consistent
with the basis the optimizer updates in. The moment transport happens in the next `optimizer.step()`, before
the Adam update, using the accumulated rotation. Holding an r × r rotation instead of the old basis keeps the
tracker's memory at one d_in × r basis.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

INITS = ("pca", "random", "identity")


def orthonormalize(u: Tensor) -> Tensor:
    """QR with column signs fixed so that diag(R) > 0: a continuous choice, so a basis that barely moves keeps
    its column signs and the moment transport sees a rotation near the identity, not random sign flips."""
    q, r = torch.linalg.qr(u)
    # torch.where, not masked assignment: no data-dependent control flow (runs under FakeTensorMode)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs


def top_eigvecs(gram: Tensor, rank: int) -> Tensor:
    """Top-`rank` eigenvectors of a symmetric PSD matrix, largest first, sign-normalised."""
    _, vecs = torch.linalg.eigh(gram)
    top = vecs[:, -rank:].flip(-1)
    # eigh's signs are arbitrary: make each column's largest-magnitude entry positive (deterministic)
    idx = top.abs().argmax(dim=0)
    pivots = top[idx, torch.arange(rank, device=top.device)]
    return top * torch.where(pivots < 0, -1.0, 1.0).to(top.dtype)


def largest_principal_angle(rotation: Tensor) -> Tensor:
    """Largest principal angle (radians, 0-dim tensor) between two r-dim subspaces, from R = U_newᵀ U_old."""
    cos = torch.linalg.svdvals(rotation.double()).min().clamp(-1.0, 1.0)
    return torch.arccos(cos)


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on Python's hash randomisation."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


class SubspaceTracker:
    """Base class: holds the basis and the bookkeeping the optimizer needs; subclasses decide how it moves.

    Subclasses implement `_init_basis(x)` (first batch) and `_next_basis(x, z)` (a refresh; `z = x @ U` with
    the current basis, already computed). `scale` multiplies the weight update (1 for orthonormal bases).
    """

    scale: float = 1.0

    def __init__(self, name: str, d_in: int, rank: int, *, update_every: int = 1, init: str = "pca",
                 seed: int = 0):
        if not 1 <= rank <= d_in:
            raise ValueError(f"rank must be in [1, {d_in}] for layer {name} (d_in={d_in}), got {rank}")
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if update_every < 1:
            raise ValueError(f"update_every must be >= 1, got {update_every}")
        self.name, self.d_in, self.rank = name, d_in, rank
        self.update_every, self.init, self.seed = update_every, init, seed
        self.basis: Tensor | None = None       # d_in × r, float32
        self.rotation: Tensor | None = None    # U_newᵀ U_old accumulated since the optimizer last consumed it
        self.steps = 0                         # optimizer steps seen
        self.last_update_step = -1
        self.drift_since_query = 0.0           # sum of largest principal angles since `pop_drift()`
        # (kept as a tensor between queries: no host sync in forward, and FakeTensorMode-safe)

    # --- used by the compressed layer -------------------------------------------------------------------
    def due(self) -> bool:
        """True when the next forward should initialise or move the basis."""
        if self.basis is None:
            return True
        return self.steps > self.last_update_step and self.steps % self.update_every == 0 and self.moves

    @property
    def moves(self) -> bool:
        return True

    @torch.no_grad()
    def observe(self, x2d: Tensor) -> None:
        """Initialise or move the basis from the live activations of this step (x2d: N × d_in)."""
        if self.basis is None:
            self.basis = self._init_basis(x2d).float().contiguous()
            self.last_update_step = self.steps
            return
        old = self.basis
        z = x2d @ old.to(x2d.dtype)
        new = self._next_basis(x2d, z).float()
        rotation = new.T @ old
        self.rotation = rotation if self.rotation is None else rotation @ self.rotation
        self.drift_since_query = self.drift_since_query + largest_principal_angle(rotation)
        self.basis.copy_(new)  # in place: modules sharing this tracker hold the same tensor
        self.last_update_step = self.steps

    # --- used by the optimizer --------------------------------------------------------------------------
    def pop_rotation(self) -> Tensor | None:
        rotation, self.rotation = self.rotation, None
        return rotation

    def pop_drift(self) -> float:
        drift, self.drift_since_query = self.drift_since_query, 0.0
        return float(drift)

    def step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"basis": self.basis, "rotation": self.rotation, "steps": self.steps,
                "last_update_step": self.last_update_step}

    def load_state_dict(self, state: dict) -> None:
        basis = state["basis"]
        if basis is not None and self.basis is not None:
            self.basis.copy_(basis)
        else:
            self.basis = None if basis is None else basis.detach().clone().float()
        self.rotation = None if state["rotation"] is None else state["rotation"].detach().clone()
        self.steps, self.last_update_step = int(state["steps"]), int(state["last_update_step"])

    # --- policies ---------------------------------------------------------------------------------------
    def _init_basis(self, x2d: Tensor) -> Tensor:
        if self.init == "identity":
            return torch.eye(self.d_in, self.rank, device=x2d.device)
        if self.init == "random":
            gen = torch.Generator(device="cpu").manual_seed(layer_seed(self.seed, self.name))
            gaussian = torch.randn(self.d_in, self.rank, generator=gen)
            return orthonormalize(gaussian).to(x2d.device)
        return top_eigvecs(gram(x2d), self.rank)

    def _next_basis(self, x2d: Tensor, z: Tensor) -> Tensor:
        raise NotImplementedError


def gram(x2d: Tensor) -> Tensor:
    """XᵀX / N in float32 (d_in × d_in): the uncentred activation covariance."""
    xf = x2d.float()
    return (xf.T @ xf) / max(x2d.shape[0], 1)


class OjaTracker(SubspaceTracker):
    """Oja's subspace rule on the uncentred activation covariance C = XᵀX/N.

        S = C U = Xᵀ Z / N,   K = Uᵀ C U = Zᵀ Z / N,   U' = qr(U + η (S − U K) / σ_max(S))

    Normalisation (the paper is silent): dividing by σ_max(S), the largest singular value of C U, makes the
    step scale-free — multiplying the activations by any constant leaves U' unchanged — and bounds the largest
    step to η, so η ∈ (0, 1] is a relative step length with the same meaning in every layer and at every
    activation scale. η → 0 freezes the basis; η ≈ 1 approaches one block power-iteration step. σ_max(S) ≤
    λ_max(C), with equality once U holds the top eigenvector, so near convergence this is Oja's rule with the
    classic η/λ_max step.
    """

    def __init__(self, name: str, d_in: int, rank: int, *, subspace_lr: float = 0.1, **kwargs):
        super().__init__(name, d_in, rank, **kwargs)
        if not subspace_lr >= 0 or math.isinf(subspace_lr):
            raise ValueError(f"subspace_lr must be a finite number >= 0, got {subspace_lr}")
        self.subspace_lr = subspace_lr

    @property
    def moves(self) -> bool:
        return self.subspace_lr > 0

    def _next_basis(self, x2d: Tensor, z: Tensor) -> Tensor:
        n = max(x2d.shape[0], 1)
        u = self.basis
        s = (x2d.T @ z).float() / n           # d_in × r
        k = (z.T @ z).float() / n             # r × r
        # clamp: activations that are all zero give S = 0 and a zero step, not a division by zero
        sigma = torch.linalg.svdvals(s)[0].clamp_min(torch.finfo(s.dtype).tiny)
        return orthonormalize(u + (self.subspace_lr / sigma) * (s - u @ k))
