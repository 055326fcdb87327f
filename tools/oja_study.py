"""The Oja step studied: how each normalisation (`oasis.subspace.OJA_NORMS`) tracks synthetic streams and
the activations of real training. Writes JSON under --out and prints one table per part.

    python tools/oja_study.py synthetic --out results/oja            # minutes on one core
    python tools/oja_study.py update-every --out results/oja         # update_every 1 vs 4, synthetic
    python tools/oja_study.py train --out results/oja --steps 400 \\
        --runs sigma_max:0.1:1,sanger:0.1:1,frozen:0:1               # ~3-4 minutes a run on one free core

synthetic: d = 64, r = 8; every step one batch of 512 Gaussian rows.
  stationary  eigenvalues 10..6 (top r), 1..0.1 (rest); a random start; steps until the largest principal
              angle to the top-r eigenspace is < 0.05 rad (and stays so for 20 steps), at most 1500.
  rotating    the same spectrum; the top-r eigenspace turns by 0.01 rad per step (each of its directions
              towards its own tail direction); the largest principal angle to the current top-r eigenspace,
              mean over steps 600-1000 (the steady lag) from a start at the exact eigenspace.
  mean        the rotating stream plus a mean of norm² 1000 (× the largest variance 10) along one fixed
              direction, as LLM activations have (a mean / a massive activation): the uncentred top-r
              space is that direction plus the top r−1 directions of the rotating part; the same lag.
  scale       each stream with the activations multiplied by 1e-3 and 1e3 (is the step scale-free?).
  Each over η ∈ {0.001, 0.003, ..., 1} for the scale-free steps and η ∈ {1e-6 .. 1e-1} for "none", all η of
  one normalisation moved together as one batch of bases through `oasis.subspace.oja_step`.

train: `suites.run c4 --profile cpu --methods oasis` settings (llama-cpu, b4 × 128, rank 32) trained for
--steps with one normalisation, η and update_every per run ("frozen" = subspace_lr 0); every --probe-every
steps, on a held-out batch (the first 8 × 128 tokens of the Wikipedia validation shard) and for every basis:
captured variance ‖XU‖²/‖XU*‖² (U* the exact top-r eigenvectors of XᵀX of that batch), the largest
principal angle to U*, and the overlap ‖U₀ᵀU‖²_F / r with the basis after the first step; the run's final
eval_loss from the suite's own evaluation. Each run is appended to train.json as it ends (a rerun skips
runs already there).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from oasis.subspace import OJA_NORMS, OjaTracker, largest_principal_angle, oja_step  # noqa: E402
from suites.core import files, records  # noqa: E402
from suites.core.cli import Parser, UsageError, cli_main  # noqa: E402

PROG = "python tools/oja_study.py"
SCALE_FREE_ETAS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
PLAIN_ETAS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
STEPS_STATIONARY, STEPS_MOVING, LAG_FROM = 1500, 1000, 600
D, R, ROWS = 64, 8, 512
OMEGA = 0.01  # rad per step, rotating streams
MEAN_NORM2 = 1000.0  # mean stream: ‖μ‖² in units of the largest variance (10)


# ------------------------------------------------------------------------------------------ synthetic


def _frame(gen):
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    return q


def _spectrum():
    return torch.cat([torch.linspace(10.0, 6.0, R), torch.linspace(1.0, 0.1, D - R)]).double()


def stream(kind: str, gen, scale: float = 1.0):
    """Yields (X, top-r eigenbasis of the stream's uncentred covariance at that step), forever."""
    q, eig = _frame(gen), _spectrum()
    mean_dir = q[:, -1]  # a direction outside the rotating planes
    step = 0
    while True:
        angle = OMEGA * step if kind in ("rotating", "mean") else 0.0
        frame = q.clone()
        # plane j = (q_j, q_{R+j}) turns by `angle`: the top-r eigenspace moves, the spectrum stays
        frame[:, :R] = math.cos(angle) * q[:, :R] + math.sin(angle) * q[:, R:2 * R]
        frame[:, R:2 * R] = -math.sin(angle) * q[:, :R] + math.cos(angle) * q[:, R:2 * R]
        x = (torch.randn(ROWS, D, generator=gen, dtype=torch.float64) * eig.sqrt()) @ frame.T
        top = frame[:, :R]
        if kind == "mean":
            x = x + math.sqrt(MEAN_NORM2 * 10.0) * mean_dir
            top = torch.cat([mean_dir[:, None], frame[:, :R - 1]], dim=1)
        yield (scale * x).float(), top.float()
        step += 1


def _angles(bases, top) -> list[float]:
    """Largest principal angle of each basis (E × d × r) to span(top), as asin σ_max((I − T Tᵀ) U)."""
    t, u = top.double(), bases.double()
    sines = torch.linalg.matrix_norm(u - t @ (t.T @ u), ord=2)
    return [math.asin(min(1.0, float(x))) for x in sines]


def _drive(tracker: OjaTracker, x) -> None:
    tracker.project(x)
    tracker.statistics()
    tracker.advance()
    tracker.step()


def _orthonormalize(u):
    """Batched QR with diag(R) > 0 (as `oasis.subspace.orthonormalize` does for one basis)."""
    q, r = torch.linalg.qr(u)
    return q * torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).unsqueeze(-2)


def run_stream(kind: str, norm: str, etas, scale: float = 1.0, seed: int = 0) -> list[dict]:
    """One stream, one normalisation, every η at once: a batch of bases moved by `oja_step` (the function
    `OjaTracker` calls) on the same data, re-orthonormalised after each step."""
    gen = torch.Generator().manual_seed(seed)
    data = stream(kind, gen, scale)
    x, top = next(data)
    if kind == "stationary":  # a random start
        start = _orthonormalize(torch.randn(D, R, generator=gen))
    else:  # the exact top-r space of the stream at step 0
        start = top
    bases = start.expand(len(etas), D, R).clone()
    eta = torch.tensor(etas, dtype=torch.float32)
    angles = []
    for _ in range(STEPS_STATIONARY if kind == "stationary" else STEPS_MOVING):
        x, top = next(data)
        z = x @ bases
        s, k = x.T @ z / x.shape[0], z.mT @ z / x.shape[0]
        # η enters linearly: step of η = 1 from oja_step, then U + η (step − U)
        unit = oja_step(bases, s, k, 1.0, norm, mean=x.mean(0).expand(len(etas), D))
        bases = _orthonormalize(bases + eta[:, None, None] * (unit - bases))
        angles.append(_angles(bases, top))
    out = []
    for i, e in enumerate(etas):
        trace = [a[i] for a in angles]
        row = {"stream": kind, "norm": norm, "eta": e, "final_angle": trace[-1]}
        if kind == "stationary":
            below = [a < 0.05 for a in trace]
            row["converged_at"] = next((j + 1 for j in range(len(below) - 20) if all(below[j:j + 20])), None)
        else:
            tail = trace[LAG_FROM:]
            row["lag"] = sum(tail) / len(tail) if all(math.isfinite(a) for a in tail) else None
        out.append(row)
    return out


def synthetic(out: Path) -> dict:
    results = []
    for kind in ("stationary", "rotating", "mean"):
        for norm in OJA_NORMS:
            for row in run_stream(kind, norm, PLAIN_ETAS if norm == "none" else SCALE_FREE_ETAS):
                results.append(row)
                print(json.dumps(row), flush=True)
    # scale: the rotating stream with activations × 1e-3, 1, 1e3; the bases after 50 steps compared
    scale_rows = []
    for norm in OJA_NORMS:
        eta = 1e-3 if norm == "none" else 0.1
        bases = {}
        for scale in (1e-3, 1.0, 1e3):
            gen = torch.Generator().manual_seed(7)
            data = stream("rotating", gen, scale)
            tracker = OjaTracker("s", D, R, subspace_lr=eta, normalization=norm, init="random", seed=7)
            tracker.project(next(data)[0])
            for _ in range(50):
                _drive(tracker, next(data)[0])
            bases[scale] = tracker.basis.clone()
        diff = {str(c): float(torch.linalg.matrix_norm(bases[c] - bases[1.0])) for c in (1e-3, 1e3)}
        scale_rows.append({"norm": norm, "eta": eta, "basis_change_vs_scale_1": diff})
        print(json.dumps(scale_rows[-1]), flush=True)
    doc = {"commit": records.git_commit(), "d": D, "r": R, "rows": ROWS, "omega": OMEGA,
           "mean_norm2_over_lambda1": MEAN_NORM2, "streams": results, "scale": scale_rows}
    files.write_json(out / "synthetic.json", doc)
    return doc


def update_every(out: Path) -> dict:
    """Rotating and dominant-mean streams through `OjaTracker` with update_every 1 and 4 (the basis moves
    after every 4th step, from that step's statistics): steady lag per (norm, η, k)."""
    rows = []
    for kind in ("rotating", "mean"):
        for norm in ("sigma_max", "sanger"):
            for eta in (0.1, 0.3):
                for every in (1, 4):
                    gen = torch.Generator().manual_seed(0)
                    data = stream(kind, gen)
                    x, top = next(data)
                    tracker = OjaTracker("s", D, R, subspace_lr=eta, normalization=norm, update_every=every)
                    tracker.project(x)  # PCA init: the start is the exact space up to sampling
                    lags = []
                    for _ in range(STEPS_MOVING):
                        x, top = next(data)
                        _drive(tracker, x)
                        lags.append(_angles(tracker.basis[None], top)[0])
                    tail = lags[LAG_FROM:]
                    rows.append({"stream": kind, "norm": norm, "eta": eta, "update_every": every,
                                 "lag": sum(tail) / len(tail)})
                    print(json.dumps(rows[-1]), flush=True)
    doc = {"commit": records.git_commit(), "d": D, "r": R, "rows": ROWS, "omega": OMEGA,
           "mean_norm2_over_lambda1": MEAN_NORM2, "runs": rows}
    files.write_json(out / "update_every.json", doc)
    return doc


# ------------------------------------------------------------------------------------------ training


def _config(steps: int, norm: str, eta: float, every: int, tmp: str, seed: int = 0) -> dict:
    from suites import run

    sets = [f"steps={steps}", f"subspace_lr={eta}", f"update_every={every}",
            f"mem_window={min(11, steps - 1)}", f"seed={seed}"]
    if norm != "frozen":
        sets.append(f"oja_norm={norm}")
    argv = ["c4", "--profile", "cpu", "--methods", "oasis", "--out", tmp]
    for s in sets:
        argv += ["--set", s]
    (cfg,) = run.check_arguments(run.parser().parse_args(argv))
    return {**cfg, "device": "cpu"}


@torch.no_grad()
def probe(model, batch: dict, first: dict) -> dict:
    """Tracking quality of every basis on `batch` (inputs captured by forward hooks)."""
    from oasis import CompressedLinear

    seen, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, CompressedLinear) and id(mod.tracker) not in {id(t) for t, _ in seen.values()}:
            def hook(module, inputs, output, key=name):
                seen[key] = (module.tracker, inputs[0].reshape(-1, inputs[0].shape[-1]).double())
            seen[name] = (mod.tracker, None)
            hooks.append(mod.register_forward_hook(hook))
    model.eval()
    model(**batch)
    model.train()
    for h in hooks:
        h.remove()
    rows = {}
    for name, (tracker, x) in seen.items():
        u = tracker.basis.double()
        gram = x.T @ x
        vals, vecs = torch.linalg.eigh(gram)
        best = vecs[:, -tracker.rank:]
        captured = float(torch.trace(u.T @ gram @ u) / vals[-tracker.rank:].sum())
        angle = float(largest_principal_angle((best.T @ u).float()))
        u0 = first.setdefault(name, u.clone())
        overlap = float((u0.T @ u).square().sum() / tracker.rank)
        rows[name] = {"captured": captured, "angle": angle, "overlap_first": overlap}
    return rows


def _summary(rows: dict) -> dict:
    out = {}
    for key in ("captured", "angle", "overlap_first"):
        vals = [r[key] for r in rows.values()]
        out[key] = sum(vals) / len(vals)
    return out


def train_one(steps: int, norm: str, eta: float, every: int, probe_every: int, tmp: str,
              seed: int = 0) -> dict:
    from suites.launch import recipe
    from suites.train import data

    cfg = _config(steps, norm, eta, every, tmp, seed)
    session = recipe.setup({"config": cfg})
    held = data.heldout_batches("wikipedia", session.tokenizer, n_tokens=8 * cfg["seq_len"], batch=8,
                                seq_len=cfg["seq_len"])[0]
    first, probes, losses = {}, [], []
    t0 = time.perf_counter()
    for step in range(steps):
        losses.append(recipe.optimizer_step(session, step, recipe.step_batches(session, step)))
        if step == 0 or (step + 1) % probe_every == 0 or step == steps - 1:
            per_layer = probe(session.model, held, first)
            probes.append({"step": step + 1, **_summary(per_layer), "per_layer": per_layer})
            print(f"  {norm} η={eta} k={every} step {step + 1}: train {losses[-1]:.3f} "
                  f"{json.dumps({k: round(v, 4) for k, v in _summary(per_layer).items()})}", flush=True)
    metrics = recipe.evaluate(session)
    return {"norm": norm, "eta": eta, "update_every": every, "steps": steps, "seed": seed,
            "config_hash": records.config_hash(cfg), "eval_loss": metrics["eval_loss"],
            "c4_sample_loss": metrics["c4_sample_loss"], "step0_eval_loss": metrics["step0"]["eval_loss"],
            "train_loss_last20": sum(losses[-20:]) / len(losses[-20:]), "train_s": time.perf_counter() - t0,
            "probes": probes}


def _parse_runs(text: str) -> list[tuple[str, float, int]]:
    runs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or parts[0] not in (*OJA_NORMS, "frozen"):
            raise UsageError(f"--runs item {item!r}: want NORM:ETA:UPDATE_EVERY, NORM one of "
                             f"{', '.join((*OJA_NORMS, 'frozen'))}")
        try:
            runs.append((parts[0], float(parts[1]), int(parts[2])))
        except ValueError:
            raise UsageError(f"--runs item {item!r}: ETA must be a number, UPDATE_EVERY an integer") from None
    return runs


def train(out: Path, steps: int, runs: list, probe_every: int, seed: int = 0) -> dict:
    import tempfile

    path = out / "train.json"
    doc = json.loads(path.read_text()) if path.exists() else {"runs": []}
    doc["commit"] = records.git_commit()
    done = {(r["norm"], r["eta"], r["update_every"], r["steps"], r.get("seed", 0)) for r in doc["runs"]}
    for norm, eta, every in runs:
        if (norm, eta, every, steps, seed) in done:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = train_one(steps, norm, eta if norm != "frozen" else 0.0, every, probe_every, tmp, seed)
        row["norm"], row["commit"] = norm, records.git_commit()
        doc["runs"].append(row)
        files.write_json(path, doc)
        last = row["probes"][-1]
        print(f"{norm:9s} η={eta:<6g} k={every}: eval_loss {row['eval_loss']:.4f}  "
              f"captured {last['captured']:.4f}  angle {last['angle']:.3f}  "
              f"overlap_first {last['overlap_first']:.3f}  ({row['train_s']:.0f}s)", flush=True)
    return doc


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="part", required=True, parser_class=Parser)
    s = sub.add_parser("synthetic")
    s.add_argument("--out", required=True)
    e = sub.add_parser("update-every")
    e.add_argument("--out", required=True)
    t = sub.add_parser("train")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--probe-every", type=int, default=50)
    t.add_argument("--seed", type=int, default=0, help="data order and model init (the profile's seed)")
    t.add_argument("--runs", required=True, help="NORM:ETA:UPDATE_EVERY,... (NORM 'frozen': subspace_lr 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        out = files.check_output_dir(args.out)
    except files.OutputError as exc:
        raise UsageError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    if args.part == "synthetic":
        synthetic(out)
    elif args.part == "update-every":
        update_every(out)
    else:
        if args.steps < 2 or args.probe_every < 1:
            raise UsageError("--steps must be >= 2 and --probe-every >= 1")
        train(out, args.steps, _parse_runs(args.runs), args.probe_every, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(PROG, main))
