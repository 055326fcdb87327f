"""Bases for the input activations of compressed linear layers.

A tracker owns one orthonormal basis U (d_in × r, float32) of the activation space of one layer — or of a
group of layers that read the same input. The compressed layer asks it for Z = X U in every training
forward; the optimizer asks it, in `step()`, to move the basis and reads back how it moved
(R = U_newᵀ U_old, r × r) to carry its moments into the new coordinates.

When a basis moves is a per-tracker policy (`refresh_in_forward`):

* statistics at the step (the default; OASIS): every training forward of a step — every micro-batch, all
  projected on the same U — adds its activation statistics, in float32, while X is alive:
  S_sum += Xᵀ Z (d_in × r), K_sum += Zᵀ Z (r × r), N += rows of X (and, for the "centred" Oja step only,
  the sum of the rows, d_in). `optimizer.step()` first does the Adam
  update in the current basis, then moves the basis from S = S_sum/N, K = K_sum/N (the statistics of the
  whole step) and transports the moments at once. Nothing but the new basis survives the step: the
  statistics are dropped, no rotation and no old basis is kept.
* refresh in forward (periodic PCA): the basis is recomputed in the forward of the first micro-batch of a
  refresh step, from that micro-batch alone, so nothing d_in × d_in is held from forward to step; the
  optimizer transports the moments with the r × r rotation at the start of its next `step()`.

Distributed runs: `reduce` (set by the optimizer from its `stats_reduce`) is a callable that sum-all-reduces a
list of tensors in place. Every statistic a basis is computed from goes through it first — the Oja
statistics [S_sum, K_sum, N] in `optimizer.step()`, and the d_in × d_in Gram [XᵀX, N] behind a PCA init or
refresh in forward — so that every rank computes the same basis from the global batch.

Activation checkpointing: a forward recomputed in backward (non-reentrant checkpointing) projects on the
current basis and does nothing else: it neither initialises nor moves a basis nor adds statistics.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import torch
from torch import Tensor

INITS = ("pca", "random", "identity")

# sum-all-reduce a list of tensors in place (e.g. `oasis.all_reduce_sum()`)
StatsReduce = Callable[[list[Tensor]], None]


def orthonormalize(u: Tensor) -> Tensor:
    """QR with column signs fixed so that diag(R) > 0: a continuous choice, so a basis that barely moves keeps
    its column signs and the moment transport sees a rotation near the identity, not random sign flips."""
    q, r = torch.linalg.qr(u)
    # torch.where, not masked assignment: no data-dependent control flow (runs under FakeTensorMode)
    signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)
    return q * signs


def orthonormalize_cholesky(a: Tensor) -> Tensor:
    """Orthonormal columns of `a` (..., n, r; a leading batch dim allowed) by Cholesky-QR2: two passes of
    Q = A R⁻¹ with Rᵀ R = AᵀA. Without a host sync (`cholesky_ex` leaves its info on the device) and the
    same Q as `orthonormalize` (Cholesky's R has a positive diagonal); the second pass restores
    orthogonality to working precision for any A with cond(A)² well below 1/eps (an Oja step from an
    orthonormal basis is that)."""
    for _ in range(2):
        chol, _ = torch.linalg.cholesky_ex(a.mT @ a)
        a = torch.linalg.solve_triangular(chol.mT, a, upper=True, left=False)
    return a


# squarings in `top_eigenvalue`: the estimate's relative error is at most (r − 1) / (2e · 2^SQUARINGS)
# (≈ 1e-7 for r = 32), whatever the spectrum; float32's range allows RENORM_EVERY squarings between
# renormalisations
SQUARINGS = 26
RENORM_EVERY = 3


def _normalised(m: Tensor) -> Tensor:
    # by the Frobenius norm (≥ every |λ|): squarings then neither overflow nor, for a matrix that rounding
    # left slightly indefinite (I − RᵀR of nearly equal subspaces), blow up
    norm = torch.linalg.vector_norm(m, dim=(-2, -1))
    return m / norm.clamp_min(torch.finfo(m.dtype).tiny)[..., None, None]


def top_singular_value(s: Tensor) -> Tensor:
    """σ_max of `s` (..., n, r) without an SVD or a host sync: √λ_max(SᵀS) (`top_eigenvalue`). Zero for
    s = 0."""
    return top_eigenvalue(s.mT @ s).sqrt()


def top_eigenvalue(m: Tensor, squarings: int = SQUARINGS) -> Tensor:
    """λ_max of a symmetric PSD `m` (..., r, r) without a host sync: m is squared `squarings` times
    (P = M^(2^k), renormalised by its norm), and λ_max(M) is read as the Rayleigh quotient
    tr(M P²) / tr(P²), whose weights (λᵢ/λ_max)^(2^(k+1)) leave only eigenvalues within a relative
    1/2^(k+1) of λ_max. Zero for m = 0."""
    p = _normalised(m)
    for i in range(squarings):
        p = p @ p
        if (i + 1) % RENORM_EVERY == 0 or i + 1 == squarings:
            p = _normalised(p)
    p2 = p @ p
    num = torch.diagonal(m @ p2, dim1=-2, dim2=-1).sum(-1)
    den = torch.diagonal(p2, dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(m.dtype).tiny)
    return (num / den).clamp_min(0)


def top_eigvecs(gram: Tensor, rank: int) -> Tensor:
    """Top-`rank` eigenvectors of a symmetric PSD matrix, largest first, sign-normalised."""
    _, vecs = torch.linalg.eigh(gram)
    top = vecs[:, -rank:].flip(-1)
    # eigh's signs are arbitrary: make each column's largest-magnitude entry positive (deterministic)
    idx = top.abs().argmax(dim=0)
    pivots = top[idx, torch.arange(rank, device=top.device)]
    return top * torch.where(pivots < 0, -1.0, 1.0).to(top.dtype)


def lean_gram(x2d: Tensor) -> Tensor:
    """XᵀX in float32 (d_in × d_in), accumulated over blocks of d_in rows (no full float32 copy of X)."""
    d_in = x2d.shape[1]
    if x2d.dtype == torch.float32:
        return x2d.T @ x2d
    gram = torch.zeros(d_in, d_in, dtype=torch.float32, device=x2d.device)
    for start in range(0, x2d.shape[0], d_in):
        block = x2d[start:start + d_in].float()
        gram.addmm_(block.T, block)
    return gram


def largest_principal_angle(rotation: Tensor) -> Tensor:
    """Largest principal angle (radians) between two r-dim subspaces, from R = U_newᵀ U_old (r × r; a
    leading batch dim gives one angle per matrix). fp64 SVD: it reads a value back on CUDA, so it is run
    only when drift is asked for (`pop_drift`, `OasisAdamW.subspace_drift`)."""
    cos = torch.linalg.svdvals(rotation.double())[..., -1].clamp(-1.0, 1.0)
    return torch.arccos(cos)


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed that does not depend on Python's hash randomisation."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _count(rows: int, device) -> Tensor:
    # float64: an exact token count for any realistic batch, and a tensor so that it can be all-reduced;
    # a fill on the device, not a copy of host data
    return torch.full((), rows, dtype=torch.float64, device=device)


# moves a tracker keeps for the drift before it folds them itself (without an optimizer that does)
PENDING_MOVES = 64
# squarings for the drift angle: a diagnostic, to ~1e-4 relative at worst (see `top_eigenvalue`)
DRIFT_SQUARINGS = 16


def largest_principal_angle_on_device(rotation: Tensor) -> Tensor:
    """`largest_principal_angle` without an SVD or a host sync: sin²θ_max = λ_max(I − RᵀR) in fp64
    (`top_eigenvalue`), which also keeps small angles accurate."""
    r = rotation.double()
    gap = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device) - r.mT @ r
    return top_eigenvalue(gap, DRIFT_SQUARINGS).clamp(0.0, 1.0).sqrt().arcsin()


class SubspaceTracker:
    """Base class: holds the basis, the step count and the policy of when the basis moves.

    Subclasses implement `_init_basis(x2d)` (first training forward) and either
      * `_next_basis()` (statistics policy): the new basis from `self.stats` = [S_sum, K_sum, N], already
        reduced across ranks; `needs_statistics = False` skips accumulating them (a data-free rule), or
      * `_refresh_basis(x2d)` with `refresh_in_forward = True`: the new basis from this micro-batch.
    `scale` multiplies the weight update (1 for orthonormal bases); `orthonormal = False` means the optimizer
    gets no rotation (nothing to transport).
    """

    scale: float = 1.0
    refresh_in_forward: bool = False
    needs_statistics: bool = True
    orthonormal: bool = True

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
        self.steps = 0                         # optimizer steps completed
        self.reduce: StatsReduce | None = None
        self.stats: list[Tensor] | None = None  # [S_sum, K_sum, N] of the current step (statistics policy)
        self.forwards = 0                      # training forwards (not recomputations) in the current step
        self.refreshed_at = -1                 # step whose forward last set the basis (refresh policy)
        self.rotation: Tensor | None = None    # refresh policy: U_newᵀ U_old until the next step() takes it
        self.drift_since_query = 0.0           # sum of largest principal angles since `pop_drift()`, beyond
        self.moved: list[tuple[int, Tensor]] = []  # (step, rotation r × r) of moves whose angles are
        # computed only when asked (an fp64 SVD reads back on CUDA); the optimizer folds older ones unasked

    @property
    def moves(self) -> bool:
        return True

    def moves_this_step(self) -> bool:
        """Statistics policy: the basis moves at the end of the current optimizer step (every
        `update_every` steps: after steps k-1, 2k-1, ..., so each basis serves `update_every` steps)."""
        return (not self.refresh_in_forward and self.moves
                and (self.steps + 1) % self.update_every == 0)

    # --- used by the compressed layer, in forward ---------------------------------------------------------
    @torch.no_grad()
    def project(self, x2d: Tensor, *, training: bool = True, recompute: bool = False) -> Tensor:
        """Z = X U (N × r, in X's dtype) for a forward with autograd on; initialises, refreshes and
        accumulates statistics as the policy says, except in a recomputation."""
        if recompute:
            if self.forwards == 0:
                raise RuntimeError(
                    f"{self.name}: a compressed layer was recomputed in backward without a forward with "
                    "autograd on in this step (reentrant activation checkpointing?); use "
                    "gradient_checkpointing_kwargs={'use_reentrant': False}")
            return x2d @ self.basis.to(x2d.dtype)
        self.forwards += 1
        if self.basis is None:
            self.basis = self._init_basis(x2d).float().contiguous()
            self.refreshed_at = self.steps
        elif (training and self.refresh_in_forward and self.moves and self.refreshed_at < self.steps
              and self.steps % self.update_every == 0):
            self._set_basis(self._refresh_basis(x2d).float())
            self.refreshed_at = self.steps
        z = x2d @ self.basis.to(x2d.dtype)
        if training and self.needs_statistics and self.moves_this_step():
            self._accumulate(x2d, z)
        return z

    def _accumulate(self, x2d: Tensor, z: Tensor) -> None:
        s, k = (x2d.T @ z).float(), (z.T @ z).float()
        if self.stats is None:
            self.stats = [s, k, _count(x2d.shape[0], x2d.device)]
        else:
            self.stats[0].add_(s)
            self.stats[1].add_(k)
            self.stats[2].add_(x2d.shape[0])

    def _reduced_gram(self, x2d: Tensor) -> Tensor:
        """XᵀX / N of this micro-batch (of the global one, through `reduce`), float32, memory-lean."""
        gram, count = lean_gram(x2d), _count(x2d.shape[0], x2d.device)
        if self.reduce is not None:
            self.reduce([gram, count])
        return gram.div_(count.clamp_min(1))

    def _set_basis(self, new: Tensor) -> Tensor | None:
        """Make `new` the basis (in place: modules sharing this tracker hold the same tensor); return the
        rotation U_newᵀ U_old (None for bases that are not orthonormal) and book the drift."""
        old = self.basis
        rotation = new.T @ old if self.orthonormal else None
        if rotation is not None:
            self.book_move(rotation)
            if self.refresh_in_forward:
                self.rotation = rotation if self.rotation is None else rotation @ self.rotation
        else:
            self.book_move(orthonormalize(new).T @ orthonormalize(old))
        old.copy_(new)
        return rotation

    def book_move(self, rotation: Tensor) -> None:
        """Book a move of the basis (R = U_newᵀ U_old of orthonormal bases) for the drift, tagged with the
        step it happened in (the optimizer folds the moves of earlier steps nobody asked about)."""
        self.moved.append((self.steps, rotation))
        if len(self.moved) > PENDING_MOVES:  # used without an optimizer and never asked: bound what is kept
            moved, self.moved = self.moved, []
            angles = largest_principal_angle_on_device(torch.stack([r for _, r in moved]))
            self.drift_since_query = self.drift_since_query + angles.sum()

    def take_moves_before(self, step: int) -> list[Tensor]:
        """Take out the rotations of the moves booked before optimizer step `step`."""
        old = [r for at, r in self.moved if at < step]
        if old:
            self.moved = [(at, r) for at, r in self.moved if at >= step]
        return old

    def take_moved_angles(self) -> Tensor | None:
        """The largest principal angles of the moves booked since the last call (one batched fp64 SVD)."""
        if not self.moved:
            return None
        moved, self.moved = self.moved, []
        return largest_principal_angle(torch.stack([r for _, r in moved]))

    # --- used by the optimizer, in step() -------------------------------------------------------------
    def statistics(self) -> list[Tensor]:
        """The tensors to sum across ranks before `advance()` ([] when nothing is to be reduced). A tracker
        that saw no forward this step contributes zeros, so every rank passes the same list."""
        if not (self.needs_statistics and self.moves_this_step() and self.basis is not None):
            return []
        if self.stats is None:
            device = self.basis.device
            self.stats = [torch.zeros(self.d_in, self.rank, device=device),
                          torch.zeros(self.rank, self.rank, device=device), _count(0, device)]
        return self.stats

    @torch.no_grad()
    def advance(self) -> Tensor | None:
        """Move the basis if due at this step (statistics already reduced); return U_newᵀ U_old or None."""
        if not self.moves_this_step() or self.basis is None:
            return None
        rotation = self._set_basis(self._next_basis().float())
        self.stats = None
        return rotation

    def pop_rotation(self) -> Tensor | None:
        """Refresh policy: the rotation of a refresh done in forward since the last step, once."""
        rotation, self.rotation = self.rotation, None
        return rotation

    def pop_drift(self) -> float:
        angles = self.take_moved_angles()
        drift, self.drift_since_query = self.drift_since_query, 0.0
        return float(drift if angles is None else angles.sum() + drift)

    def step(self) -> None:
        """End of an optimizer step: statistics of this step are gone whatever happened to them."""
        self.steps += 1
        self.forwards = 0
        self.stats = None

    def state_dict(self) -> dict:
        return {"basis": self.basis, "steps": self.steps, "refreshed_at": self.refreshed_at,
                "rotation": self.rotation}

    def load_state_dict(self, state: dict) -> None:
        basis = state["basis"]
        if basis is not None and self.basis is not None:
            self.basis.copy_(basis)
        else:
            self.basis = None if basis is None else basis.detach().clone().float()
        rotation = state.get("rotation")
        self.rotation = None if rotation is None else rotation.detach().clone()
        self.steps, self.refreshed_at = int(state["steps"]), int(state["refreshed_at"])
        self.stats, self.forwards = None, 0

    # --- policies ---------------------------------------------------------------------------------------
    def _init_basis(self, x2d: Tensor) -> Tensor:
        if self.init == "identity":
            return torch.eye(self.d_in, self.rank, device=x2d.device)
        if self.init == "random":
            gen = torch.Generator(device="cpu").manual_seed(layer_seed(self.seed, self.name))
            gaussian = torch.randn(self.d_in, self.rank, generator=gen)
            return orthonormalize(gaussian).to(x2d.device)
        return top_eigvecs(self._reduced_gram(x2d), self.rank)

    def _next_basis(self) -> Tensor:
        raise NotImplementedError

    def _refresh_basis(self, x2d: Tensor) -> Tensor:
        raise NotImplementedError


# How the Oja step is normalised (the paper is silent; see `oja_step` and results/oja/README.md)
OJA_NORMS = ("sigma_max", "sanger", "trace", "centred", "none")


def oja_step(basis: Tensor, s: Tensor, k: Tensor, subspace_lr: float, normalization: str = "sanger",
             mean: Tensor | None = None) -> Tensor:
    """One Oja subspace step, not yet re-orthonormalised: U + η (S − U K) / norm, batched over any leading
    dims and free of host syncs. basis U: ... × d × r (orthonormal); s = C U, k = Uᵀ C U with C = XᵀX / N
    the uncentred covariance of the step; mean: ... × d, the mean row of X (needed by "centred" only).

    `S − U K = (I − U Uᵀ) C U` is the part of C U outside span(U): only it moves the subspace, and near
    the top-r eigenspace V of C the tangent E (U = V + V_⊥ E) contracts per step entrywise as
    e_kj ← e_kj (1 − h (λ_j − λ_k)), h the step's η / norm. The normalisations:

    * "sigma_max": norm = σ_max(S) (≈ λ_1). Scale-free, every step's tangent ≤ η; but every direction
      contracts at η (λ_j − λ_k)/λ_1, so when one direction dominates (the mean of the activations, a
      massive activation) all the others move λ_1/λ_j times slower.
    * "sanger" (the default, chosen by measurement: results/oja/README.md): Sanger's generalised Hebbian
      rule, S − U triu(K) (column j deflated by columns 1..j only, so columns converge to eigenvectors in
      order, largest first, as the PCA init orders them), each column divided by its own ‖C u_j‖ ≥ its
      Rayleigh quotient u_jᵀ C u_j. Scale-free, each column's tangent ≤ η, and column j contracts at
      about η (λ_j − λ_k)/λ_j: a dominant direction slows only itself.
    * "trace": norm = tr(K) = Σ_j u_jᵀ C u_j (free: K is there; tr(C) would need a statistic more and adds
      the whole d − r tail, slower still). Scale-free; tr(K) ≥ σ_max(S) at the fixed point, so never
      faster than "sigma_max" there (up to r times slower).
    * "centred": "sigma_max" on the covariance of the centred activations, C − μμᵀ (S − μ(μᵀU),
      K − (Uᵀμ)(Uᵀμ)ᵀ): the mean no longer dominates, but the basis then tracks the top-r subspace of
      the *centred* covariance, which need not contain the mean direction the weight gradient δᵀX has.
    * "none": norm = 1, plain η. Not scale-free: the step grows with the square of the activation scale,
      so one η cannot suit layers whose activations differ by orders of magnitude.
    """
    if normalization not in OJA_NORMS:
        raise ValueError(f"normalization must be one of {', '.join(OJA_NORMS)}, got {normalization!r}")
    tiny = torch.finfo(s.dtype).tiny
    if normalization == "centred":
        if mean is None:
            raise ValueError("normalization='centred' needs the mean activation (mean=...)")
        projected_mean = mean.unsqueeze(-2) @ basis  # ... × 1 × r: μᵀU
        s = s - mean.unsqueeze(-1) * projected_mean
        k = k - projected_mean.mT @ projected_mean
    if normalization == "sanger":
        residual = s - basis @ torch.triu(k)
        column_norms = torch.linalg.vector_norm(s, dim=-2, keepdim=True)  # ‖C u_j‖, ... × 1 × r
        return basis + residual * (subspace_lr / column_norms.clamp_min(tiny))
    residual = s - basis @ k
    if normalization == "none":
        return basis + subspace_lr * residual
    if normalization == "trace":
        norm = torch.diagonal(k, dim1=-2, dim2=-1).sum(-1)
    else:  # sigma_max, centred
        norm = top_singular_value(s)
    # clamp: activations that are all zero give S = 0 and a zero step, not a division by zero
    step = subspace_lr / norm.clamp_min(tiny)
    return basis + step[..., None, None] * residual


class OjaTracker(SubspaceTracker):
    """Oja's subspace rule on the activation covariance C = XᵀX/N of a whole optimizer step.

        S = C U = Σ Xᵀ Z / N,   K = Uᵀ C U = Σ Zᵀ Z / N,   U' = qr(U + η (S − U K) / norm)

    (sums over the step's micro-batches, and across ranks through `reduce`). The normalisation (the paper
    is silent) is `normalization`, one of `OJA_NORMS`, see `oja_step`; the default "sanger" (each column
    deflated by the columns before it and divided by its own ‖C u_j‖) follows a moving subspace where
    "sigma_max" (the step divided by σ_max(S)) lags behind a dominant direction (results/oja/README.md).
    "centred" adds one statistic, the sum of the step's rows (d_in floats, reduced across ranks with S and
    K). η → 0 freezes the basis; for the scale-free normalisations η ∈ (0, 1] is a relative step length,
    the same in every layer.
    (`oja_step`, then Cholesky-QR2 for the qr: the same Q as a QR with diag(R) > 0.)
    """

    def __init__(self, name: str, d_in: int, rank: int, *, subspace_lr: float = 0.1,
                 normalization: str = "sanger", **kwargs):
        super().__init__(name, d_in, rank, **kwargs)
        if not subspace_lr >= 0 or math.isinf(subspace_lr):
            raise ValueError(f"subspace_lr must be a finite number >= 0, got {subspace_lr}")
        if normalization not in OJA_NORMS:
            raise ValueError(f"normalization must be one of {', '.join(OJA_NORMS)}, got {normalization!r}")
        self.subspace_lr = subspace_lr
        self.normalization = normalization

    @property
    def moves(self) -> bool:
        return self.subspace_lr > 0

    def oja_settings(self) -> dict:
        """The keyword arguments of `oja_step` besides the tensors: trackers with equal settings, shapes
        and class move together in one batched step (`oasis.grouped`)."""
        return {"subspace_lr": self.subspace_lr, "normalization": self.normalization}

    def _accumulate(self, x2d: Tensor, z: Tensor) -> None:
        fresh = self.stats is None
        super()._accumulate(x2d, z)
        if self.normalization == "centred":
            row_sum = x2d.sum(0, dtype=torch.float32)
            if fresh:
                self.stats.append(row_sum)
            else:
                self.stats[3].add_(row_sum)

    def statistics(self) -> list[Tensor]:
        stats = super().statistics()
        if stats and self.normalization == "centred" and len(stats) == 3:  # no forward this step: zeros
            stats.append(torch.zeros(self.d_in, device=stats[0].device))
        return stats

    def _next_basis(self) -> Tensor:
        s_sum, k_sum, count = self.stats[:3]
        count = count.clamp_min(1)  # no rows seen: S = K = 0, a zero step (no data-dependent branch)
        mean = self.stats[3] / count if self.normalization == "centred" else None
        return orthonormalize_cholesky(oja_step(self.basis, s_sum / count, k_sum / count, mean=mean,
                                                **self.oja_settings()))
