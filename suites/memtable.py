"""The whole field's training memory at Llama-2-7B scale, as one table: `python -m suites.memtable`.

Every point is one `suites.measure.memory.measure` estimate (FakeTensorMode, a real training step, CUDA's
dropout
mask): Llama-2-7B, rank 32, pure bf16, sequence 512, micro-batch 1-32, each method stock and with the generic
tricks offered to every method alike (chunked loss, lean RMSNorm/SwiGLU), without and with activation
checkpointing, plus OASIS-only options as extra rows. Points are written to the JSON file as they land (with
the commit that measured them), so an interrupted build resumes where it stopped; the Markdown table is
written from the JSON alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

from suites.core import cli, files

PROG = "python -m suites.memtable"
MODEL, RANK, SEQ, DTYPE = "llama-2-7b", 32, 512, "bfloat16"
MISSION = ("adam", "lora", "galore", "ldadam", "pca", "oasis")
EXTRAS = ("adam8bit", "galore8bit", "apollo", "apollo-mini", "adam-mini", "qlora")
# OASIS-only memory options (baselines/oasis.py), shown as extra rows: name -> (method, hyper-parameters)
VARIANTS = {"oasis+lm_head": ("oasis", {"compress_lm_head": True}),
            "oasis+emb-bwd": ("oasis", {"embedding_update": "backward"}),
            "oasis+both": ("oasis", {"compress_lm_head": True, "embedding_update": "backward"})}
REGIMES = {"stock": {"loss": "full", "lean_blocks": False},
           "tricks": {"loss": "chunked", "lean_blocks": True}}
# every weight is trained (adapters and quantized bases are not)
FULL_PARAMETER = ("adam", "galore", "ldadam", "pca", "oasis", "adam8bit", "galore8bit", "apollo",
                  "apollo-mini", "adam-mini")
RIVALS = ("lora", "galore", "ldadam", "apollo")  # "OASIS / best other" of the issue
GIB = 2**30


def points(batches) -> list[dict]:
    """Every point of the table: the whole field at micro-batch 8 in both regimes; the micro-batch sweep in
    the tricks regime; each without and with checkpointing."""
    rows = list(MISSION) + list(EXTRAS) + list(VARIANTS)
    out = []
    for ckpt in (False, True):
        for regime in REGIMES:
            for batch in batches:
                if regime == "stock" and batch != 8:
                    continue
                out += [{"row": r, "regime": regime, "checkpointing": ckpt, "batch": batch} for r in rows]
    return out


def key(point: dict) -> str:
    return f"{point['row']}|{point['regime']}|ckpt={point['checkpointing']}|mb={point['batch']}"


def measure_point(point: dict) -> dict:
    from suites.core import records
    from suites.measure import memory

    method, overrides = VARIANTS.get(point["row"], (point["row"], {}))
    row = memory.measure(MODEL, method, batch=point["batch"], seq=SEQ, rank=RANK, dtype=DTYPE,
                         checkpointing=point["checkpointing"], overrides=overrides,
                         **REGIMES[point["regime"]])
    return {**point, "peak_bytes": row["peak_bytes"], "breakdown": row["breakdown"],
            "kernel_policy": row["kernel_policy"], "commit": records.git_commit(), "wall_s": row["wall_s"]}


def _worker(point: dict) -> dict:
    from suites.core.cli import quiet_libraries

    quiet_libraries()
    try:
        return measure_point(point)
    except (RuntimeError, ValueError) as exc:  # a method that cannot run this way: one line in the table
        return {**point, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"}


def read_points(json_path: Path) -> dict:
    """The points measured so far ({} when none); files of the first version held the points bare."""
    if not json_path.exists():
        return {}
    data = json.loads(json_path.read_text())
    return data["points"] if "points" in data else data


def write_points(json_path: Path, done: dict) -> None:
    files.write_json(json_path, {"tool": "suites.memtable", "model": MODEL, "points": done})


def build(json_path: Path, batches, jobs: int, log=print) -> dict:
    done = read_points(json_path)
    # micro-batch 8 first (the targets are stated there), then the sweep outwards from it
    todo = sorted((p for p in points(batches) if key(p) not in done),
                  key=lambda p: (abs(p["batch"].bit_length() - 4), p["batch"], p["checkpointing"]))
    log(f"{len(done)} points measured before, {len(todo)} to measure ({jobs} processes)")
    t0 = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        for i, result in enumerate(pool.map(_worker, todo), 1):
            done[key(result)] = result
            write_points(json_path, done)  # every point is kept as soon as it lands
            peak = f"{result['peak_bytes'] / GIB:.2f} GiB" if "peak_bytes" in result else result["error"]
            log(f"  [{i}/{len(todo)}] {key(result)}: {peak} ({time.perf_counter() - t0:.0f} s)")
    return done


def render(done: dict, batches) -> str:
    """The Markdown table, from the measured points only (a point not measured shows as '-')."""
    commits = sorted({p.get("commit") or "?" for p in done.values()})
    rows = list(MISSION) + list(EXTRAS) + list(VARIANTS)
    lines = [f"# {MODEL} training memory: the whole field (r={RANK}, seq {SEQ}, pure bf16)", "",
             f"Produced by `{PROG}` at commit(s) {', '.join(commits)}; every number is a "
             "`suites.memory` estimate (FakeTensorMode, a real training step after a warm-up step; CUDA's "
             "1-byte dropout mask; periodic methods refresh inside the measured step). GiB = 2^30 bytes. "
             "`tricks` = chunked loss and lean RMSNorm/SwiGLU, offered to every method alike. Full-parameter "
             "methods train every weight; lora and qlora train adapters (qlora over a 4-bit base).", ""]
    missing = [p for p in points(batches) if key(p) not in done]
    if missing:
        where = ", ".join(str(b) for b in sorted({p["batch"] for p in missing}))
        lines += [f"**Incomplete:** {len(missing)} of {len(points(batches))} points are not measured yet "
                  f"(micro-batches {where}), shown as '-'; `{PROG}` measures them and keeps the rest.", ""]

    def peak(row, regime, ckpt, batch):
        p = done.get(key({"row": row, "regime": regime, "checkpointing": ckpt, "batch": batch}))
        if p is None:
            return None, "-"
        if "peak_bytes" not in p:
            return None, "refused"
        return p["peak_bytes"], f"{p['peak_bytes'] / GIB:.2f}"

    for ckpt in (False, True):
        label = "with" if ckpt else "without"
        lines += [f"## Micro-batch 1-32, tricks, {label} checkpointing (peak GiB)", "",
                  "| method | " + " | ".join(f"mb {b}" for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for row in rows:
            lines.append(f"| {row} | " + " | ".join(peak(row, "tricks", ckpt, b)[1] for b in batches) + " |")
        lines.append("")
        for b in batches:
            lines.append(f"- mb {b}: " + _verdict({r: peak(r, "tricks", ckpt, b)[0] for r in rows}))
        lines.append("")
    lines += ["## Micro-batch 8: stock vs tricks, breakdown (GiB)", "",
              "| method | regime | checkpointing | peak | params | grads | optimizer | activations | other |",
              "|---|---|---|---|---|---|---|---|---|"]
    for ckpt in (False, True):
        for regime in REGIMES:
            for row in rows:
                p = done.get(key({"row": row, "regime": regime, "checkpointing": ckpt, "batch": 8}))
                if p is None or "peak_bytes" not in p:
                    continue
                parts = " | ".join(f"{p['breakdown'][c] / GIB:.2f}" for c in
                                   ("params", "grads", "optimizer", "activations", "other"))
                lines.append(f"| {row} | {regime} | {ckpt} | {p['peak_bytes'] / GIB:.2f} | {parts} |")
    return "\n".join(lines) + "\n"


def _verdict(peaks: dict) -> str:
    oasis = peaks.get("oasis")
    if oasis is None:
        return "oasis not measured"
    parts = []
    if peaks.get("adam"):
        parts.append(f"oasis/adam = {oasis / peaks['adam']:.3f}")
    rivals = {r: peaks[r] for r in RIVALS if peaks.get(r)}
    if rivals:
        best = min(rivals, key=rivals.get)
        parts.append(f"oasis/best of {', '.join(RIVALS)} ({best}) = {oasis / rivals[best]:.3f}")
    full = {r: peaks[r] for r in FULL_PARAMETER if peaks.get(r) and r != "oasis"}
    lower_full = sorted(r for r, v in full.items() if v < oasis)
    parts.append("oasis is the lowest full-parameter method" if not lower_full
                 else f"full-parameter methods below oasis: {', '.join(lower_full)}")
    lower_other = sorted(r for r in ("lora", "qlora") if peaks.get(r) and peaks[r] < oasis)
    if lower_other:
        parts.append(f"adapter methods below oasis: {', '.join(lower_other)}")
    return "; ".join(parts)


def parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/memory"),
                   help="folder of llama-2-7b-field.{json,md}")
    p.add_argument("--batches", default="1,2,4,8,16,32",
                   help="micro-batches of the sweep (8 is always included)")
    p.add_argument("--jobs", type=int, default=2,
                   help="processes measuring at once (each holds one estimate)")
    p.add_argument("--render-only", action="store_true",
                   help="write the Markdown from the JSON, measure nothing")
    return p


def _main(argv) -> int:
    args = parser().parse_args(argv)
    try:
        batches = sorted({int(b) for b in args.batches.split(",") if b.strip()} | {8})
    except ValueError:
        raise cli.UsageError(f"--batches {args.batches!r}: expected comma-separated integers") from None
    if min(batches) < 1 or args.jobs < 1:
        raise cli.UsageError("--batches and --jobs must be positive")
    files.check_output_dir(args.out)
    json_path, md_path = args.out / "llama-2-7b-field.json", args.out / "llama-2-7b-field.md"
    if args.render_only:
        done = read_points(json_path)
    else:
        done = build(json_path, batches, args.jobs, log=lambda m: print(m, file=sys.stderr))
    files.atomic_write(md_path, render(done, batches))
    print(f"wrote {md_path} ({len(done)} points)")
    return 0


def main(argv=None) -> int:
    return cli.cli_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
