"""Markdown tables of the Oja study (`tools/oja_study.py`) from its JSON files.

    python tools/oja_tables.py results/oja          # prints the tables of synthetic.json and train.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NOT_TRACKING = 0.5  # a mean lag above this (rad) means the basis does not follow the stream (see README)


def _fmt(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def synthetic_tables(doc: dict) -> str:
    lines = [f"commit `{doc['commit']}`; d = {doc['d']}, r = {doc['r']}, {doc['rows']} rows a step, "
             f"ω = {doc['omega']} rad/step, mean stream ‖μ‖² = {doc['mean_norm2_over_lambda1']:g} λ₁", ""]
    rows = doc["streams"]
    for kind, what in (("stationary", "steps until the largest principal angle stays < 0.05 rad "
                                      "(— : not within 1500 steps; final angle in brackets)"),
                       ("rotating", "steady lag, rad (mean over steps 600-1000; ≥ 0.5: not tracking)"),
                       ("mean", "steady lag to the uncentred top-r space, rad (≥ 0.5: not tracking)")):
        lines += [f"**{kind}**: {what}", ""]
        for norms, etas in ((("sigma_max", "sanger", "trace", "centred"), None), (("none",), None)):
            etas = sorted({r["eta"] for r in rows if r["stream"] == kind and r["norm"] == norms[0]})
            lines.append("| η | " + " | ".join(norms) + " |")
            lines.append("|---" * (len(norms) + 1) + "|")
            for eta in etas:
                cells = []
                for norm in norms:
                    (r,) = [r for r in rows if r["stream"] == kind and r["norm"] == norm and r["eta"] == eta]
                    if kind == "stationary":
                        cells.append(f"{r['converged_at'] or '—'} ({r['final_angle']:.3f})")
                    else:
                        cells.append(_fmt(r["lag"]))
                lines.append(f"| {eta:g} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["**scale**: Frobenius change of the basis after 50 steps when the activations are × 1e-3 or "
              "× 1e3 (0 = scale-free)", "", "| norm | η | × 1e-3 | × 1e3 |", "|---|---|---|---|"]
    for r in doc["scale"]:
        change = r["basis_change_vs_scale_1"]
        lines.append(f"| {r['norm']} | {r['eta']:g} | {change['0.001']:.2g} | {change['1000.0']:.2g} |")
    return "\n".join(lines)


def train_table(doc: dict) -> str:
    lines = ["| oja_norm | η | update_every | seed | eval_loss | c4_sample_loss | "
             "captured (mean over probes) | captured at end | overlap with step-1 basis at end | commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        probes = r["probes"]
        mean_captured = sum(p["captured"] for p in probes) / len(probes)
        last = probes[-1]
        lines.append(f"| {r['norm']} | {r['eta']:g} | {r['update_every']} | {r.get('seed', 0)} | "
                     f"{r['eval_loss']:.4f} | {r['c4_sample_loss']:.4f} | {mean_captured:.3f} | "
                     f"{last['captured']:.3f} | {last['overlap_first']:.3f} | `{r['commit'][:10]}` |")
    lines += ["", "captured over training (probe step: mean over bases of ‖XU‖²/‖XU*‖²):", ""]
    steps = [p["step"] for p in doc["runs"][0]["probes"]]
    lines.append("| run | " + " | ".join(str(s) for s in steps) + " |")
    lines.append("|---" * (len(steps) + 1) + "|")
    for r in doc["runs"]:
        by_step = {p["step"]: p["captured"] for p in r["probes"]}
        lines.append(f"| {r['norm']} η={r['eta']:g} k={r['update_every']} seed {r.get('seed', 0)} | "
                     + " | ".join(_fmt(by_step.get(s)) for s in steps) + " |")
    return "\n".join(lines)


def update_every_table(doc: dict) -> str:
    lines = [f"commit `{doc['commit']}`; steady lag (rad, mean over steps 600-1000; ≥ 0.5: not tracking)", "",
             "| stream | oja_norm | η | update_every 1 | update_every 4 |", "|---|---|---|---|---|"]
    keys = sorted({(r["stream"], r["norm"], r["eta"]) for r in doc["runs"]},
                  key=lambda k: (k[0] != "rotating",) + k)
    for stream, norm, eta in keys:
        lag = {r["update_every"]: r["lag"] for r in doc["runs"]
               if (r["stream"], r["norm"], r["eta"]) == (stream, norm, eta)}
        lines.append(f"| {stream} | {norm} | {eta:g} | {_fmt(lag.get(1))} | {_fmt(lag.get(4))} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python tools/oja_tables.py DIR", file=sys.stderr)
        return 2
    folder = Path(argv[0])
    for name, make in (("synthetic.json", synthetic_tables), ("update_every.json", update_every_table),
                       ("train.json", train_table)):
        path = folder / name
        if path.exists():
            print(f"### {name}\n\n{make(json.loads(path.read_text()))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
