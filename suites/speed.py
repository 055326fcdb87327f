"""Speed of every method's training step: ops dispatched, host syncs, linalg calls, and step times.

    python -m suites.speed --model smollm2-135m --methods all,apollo --json results/speed/smollm2-135m.json
    python -m suites.speed --model llama-2-7b --methods all --no-cpu-time         # ops only
    python -m suites.speed --model smollm2-135m --kind cuda                       # on a GPU: CUDA-event times

Op counts (`--kind estimate`, the default): the model and the method are built under FakeTensorMode as
`suites.memory` builds them (same model specs, same policy: pure `--dtype`, SDPA, dropout stored as on
CUDA), and one training step after a warm-up step runs under `suites.measure.dispatch.DispatchCounter`:
compute ops
(forward, backward, optimizer = `step()` + `zero_grad()`), host synchronisations (the sync-class ops of
`suites.measure.dispatch`) and linalg calls. Nothing is allocated, so a 7B model is counted on a laptop.
  step     the second step at the method's trained refresh period (its registry default): the steady step
           of a periodic method; for a method that moves its basis every step (OASIS, LDAdam) a basis move
  refresh  a step that recomputes the basis. A periodic method (`suites.measure.memory.REFRESH_KEYS`) is built
  a second time with its period key set to 1, so that the counted step is a refresh: the trained
           build keeps its period, the forced one is only counted
  /step    amortised over the trained period p: ((p - 1) * step + refresh) / p
Counted as on CUDA: torch's own optimizers (AdamW for adam, lora, ...) default to foreach on CUDA and to the
single-tensor loop on CPU; their `foreach=None` is set to True before counting (`cuda_optimizer_defaults`).
Optimizers of other libraries (galore-torch, bitsandbytes, apollo-torch) and the project's own have no
such default and are counted as they are. bitsandbytes' kernels are custom ops and count as ops.

CPU time (`--cpu-time`, on by default with --kind estimate): a launch-bound shape (`--cpu-hidden` 64, 30
layers, a 1024-token vocabulary, batch 1 x 32 tokens, float32, one thread), every method built for real at
its trained period, warmed up, then `--cpu-rounds` rounds in which each method runs one step in turn
(interleaved, so drift of the machine hits every method alike); the median step and optimizer times and
their ratio to adam's from the same run.

`--kind cuda` (a GPU): real models on the GPU at the trained period; after `--warmup` steps, a window of
T = max(period, `--cuda-steps`) steps is timed with CUDA events (amortised: a window that spans a whole
refresh period), and each step's optimizer part with its own pair of events; torch's sync debug mode counts
the synchronisations CUDA itself reports over one step; with `--try-graph` a CUDA-graph capture of
`optimizer.step()` is tried once (its outcome, one line, in the row; one method per run, since a failed
capture can leave the CUDA context unusable). Refused without a CUDA device.

Outputs: a table on stdout (`--markdown` for Markdown), `--json PATH` and `--md PATH` (written atomically,
checked before measuring); the JSON names the git commit and refuses a dirty tree (`--allow-dirty` for trials,
then the commit ends in "+dirty").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from suites.core import cli, dtypes, files, records
from suites.measure.speed import (
    KINDS,
    LAUNCH_BOUND,
    count_method,
    cpu_times,
    cuda_times,
    require_cuda,
)

PROG = "python -m suites.speed"


# -- tables --------------------------------------------------------------------------------------------------

def _fmt(n) -> str:
    return "-" if n is None else f"{n:,}" if isinstance(n, int) else f"{n:,.1f}"


def _linalg_text(counts: dict | None) -> str:
    if not counts or not counts["linalg_ops"]:
        return "-"
    return ", ".join(f"{n} {name.split('.', 1)[1]}" for name, n in counts["linalg_ops"].items())


def format_table(report: dict, markdown: bool = False) -> str:
    rows = report["results"]
    if report["config"]["kind"] == "cuda":
        cols = ("method", "period", "window", "step ms", "/adam", "optimizer ms", "CUDA syncs/step",
                "graph capture")
        lines = [(r["method"], _fmt(r["period"]), _fmt(r["window_steps"]), f"{r['step_ms']:.2f}",
                  "-" if r.get("step_to_adam") is None else f"{r['step_to_adam']:.3f}",
                  f"{r['optimizer_ms']:.2f}", _fmt(r["cuda_syncs_in_step"]), r["graph_capture"])
                 for r in rows]
    else:
        cpu = report.get("cpu_time") or {}
        cols = ("method", "period", "fwd ops", "bwd ops", "opt ops", "ops/step", "refresh ops",
                "/step amortised", "/adam", "syncs/step", "refresh syncs", "linalg (refresh step)",
                "CPU step /adam", "CPU opt ms")
        adam = next((r for r in rows if r["method"] == "adam"), None)
        lines = []
        for r in rows:
            s, f = r["step"], r["refresh"]
            ph = s["phases"]
            t = cpu.get(r["method"], {})
            worst = max(s["ops"], f["ops"] if f else 0)
            lines.append((r["method"], _fmt(r["period"]), _fmt(ph["forward"]["ops"]),
                          _fmt(ph["backward"]["ops"]), _fmt(ph["optimizer"]["ops"]), _fmt(s["ops"]),
                          _fmt(f["ops"] if f else None),
                          _fmt(r["ops_per_step"]),
                          "-" if adam is None else f"{worst / adam['step']['ops']:.2f}",
                          _fmt(s["syncs"]), _fmt(f["syncs"] if f else None), _linalg_text(f or s),
                          "-" if t.get("step_to_adam") is None else f"{t['step_to_adam']:.2f}",
                          "-" if not t else f"{t['optimizer_ms']:.1f}"))
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*cols)] + [fmt.format(*line) for line in lines])


NOTES = ("ops: ATen compute ops dispatched (views and allocation-only factories excluded; "
         "suites.measure.dispatch), one step after a warm-up, under FakeTensorMode; "
         "step = the second step at the "
         "trained refresh period, refresh = a basis-recomputing step (period forced to 1 on a second build), "
         "/step = amortised over the period; /adam = the larger of step and refresh over adam's step; "
         "syncs: sync-class ops "
         "(suites.measure.dispatch.SYNC_OPS, tags, device changes); "
         "torch optimizers counted with foreach (CUDA "
         "default); CPU: launch-bound shape, one thread, median of interleaved steps, ratio to adam in the "
         "same run.")


# -- command line --------------------------------------------------------------------------------------------

def run(args, log, commit: str | None = None) -> dict:
    """The report; `commit` is the tree's, read before measuring (edits during a long run do not count)."""
    from suites.core.registry import resolve_methods

    methods = resolve_methods(args.methods)
    if args.kind == "cuda":
        require_cuda()
    overrides = dict(args.set)
    rows = []
    t0 = time.perf_counter()
    for method in methods:
        try:
            if args.kind == "cuda":
                row = cuda_times(args.model, method, batch=args.batch, seq=args.seq, rank=args.rank,
                                 dtype=args.dtype, attn=args.attn, min_steps=args.cuda_steps,
                                 warmup=args.warmup, try_graph=args.try_graph)
            else:
                row = count_method(args.model, method, batch=args.batch, seq=args.seq, rank=args.rank,
                                   dtype=args.dtype, attn=args.attn, overrides=overrides)
        except ValueError as exc:
            raise ValueError(f"{method}: {exc}") from None
        rows.append(row)
        if args.kind == "cuda":
            log(f"  {method}: {row['step_ms']:.2f} ms/step over {row['window_steps']} steps")
        else:
            log(f"  {method}: {row['step']['ops']:,} ops, {row['step']['syncs']} syncs "
                f"({row['count_s']} s)")
    report = {"config": {"model": args.model, "kind": args.kind, "batch": args.batch, "seq": args.seq,
                         "rank": args.rank, "dtype": dtypes.canonical(args.dtype), "attn": args.attn,
                         "set": overrides, "torch": torch.__version__, "commit": commit},
              "results": rows}
    if args.kind == "cuda":
        adam = next((r for r in rows if r["method"] == "adam"), None)
        for r in rows:
            r["step_to_adam"] = None if adam is None else round(r["step_ms"] / adam["step_ms"], 4)
        report["config"].update(cuda_steps=args.cuda_steps, warmup=args.warmup)
    elif args.cpu_time:
        report["cpu_time"] = cpu_times(methods, hidden=args.cpu_hidden, rounds=args.cpu_rounds, log=log)
        report["config"]["cpu_shape"] = {**LAUNCH_BOUND, "hidden": args.cpu_hidden, "dtype": "float32",
                                         "threads": 1, "rounds": args.cpu_rounds}
    report["config"]["wall_s"] = round(time.perf_counter() - t0, 1)
    return report


def parser() -> argparse.ArgumentParser:

    p = cli.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="any model spec suites.memory accepts (preset, named model, GGUF, folder, hub id, "
                        "config.json)")
    p.add_argument("--methods", default="all",
                   help="'all' (the six mission methods), extras too: all,apollo,...")
    p.add_argument("--kind", choices=KINDS, default="estimate",
                   help="estimate: op counts under FakeTensorMode (+ CPU times); cuda: CUDA-event step times")
    p.add_argument("--batch", type=cli.positive_int, default=8)
    p.add_argument("--seq", type=cli.positive_int, default=512)
    p.add_argument("--rank", type=cli.positive_int, default=32)
    p.add_argument("--dtype", type=cli.dtype_name, default="bfloat16")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--set", action="append", type=cli.key_value, default=[], metavar="KEY=VALUE",
                   help="a method hyper-parameter (JSON value)")
    p.add_argument("--no-cpu-time", dest="cpu_time", action="store_false",
                   help="skip the launch-bound CPU timing (estimate kind)")
    p.add_argument("--cpu-hidden", type=cli.positive_int, default=LAUNCH_BOUND["hidden"])
    p.add_argument("--cpu-rounds", type=cli.positive_int, default=15)
    p.add_argument("--cuda-steps", type=cli.positive_int, default=20,
                   help="--kind cuda: at least this many steps timed (a whole refresh period if longer)")
    p.add_argument("--try-graph", action="store_true",
                   help="--kind cuda: try to capture optimizer.step() in a CUDA graph after timing (a failed "
                        "capture can leave the CUDA context unusable: one method per run)")
    p.add_argument("--warmup", type=cli.nonnegative_int, default=3, help="--kind cuda: untimed steps first")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    p.add_argument("--md", type=Path, help="write the table as Markdown here")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--allow-dirty", action="store_true",
                   help="write --json/--md from a tree with uncommitted changes (trials only)")
    p.add_argument("--quiet", action="store_true")
    return p


def _main(argv) -> int:
    args = parser().parse_args(argv)
    try:
        for path, what in ((args.json, "--json"), (args.md, "--md")):
            if path:
                files.check_output_file(path, what)
        commit = records.git_commit()
        if (args.json or args.md) and not args.allow_dirty and (commit is None or commit.endswith("+dirty")):
            raise ValueError("results name the commit that produced them; the tree is "
                             f"{commit or 'not git'}: commit first (or --allow-dirty for a trial)")
        from suites.core.registry import resolve_methods
        from suites.measure.memory import load_config

        resolve_methods(args.methods)
        load_config(args.model)

        def log(msg):
            if not args.quiet:
                print(msg, file=sys.stderr, flush=True)

        report = run(args, log, commit)
    except ValueError as exc:
        raise cli.UsageError(str(exc)) from None
    table = format_table(report, markdown=args.markdown)
    print(table)
    print(NOTES)
    if args.json:
        files.write_json(args.json, report)
    if args.md:
        c = report["config"]
        head = (f"# Speed: {c['model']}, {c['kind']}, batch {c['batch']} x {c['seq']}, rank {c['rank']}, "
                f"{c['dtype']}\n\nCommit {c['commit']}, torch {c['torch']}.\n\n")
        files.atomic_write(args.md, head + format_table(report, markdown=True) + "\n\n" + NOTES + "\n")
    return 0


def main(argv=None) -> int:
    return cli.cli_main(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
