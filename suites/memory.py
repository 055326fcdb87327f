"""Peak training memory of every method at any model scale, measured by running real training steps.

    python -m suites.memory --model llama-2-7b --methods all --batch 8 --seq 512 --rank 32
    python -m suites.memory --model llama-2-7b --methods all --batch 64 --nproc 8 --strategy fsdp

For each method: build the model from its config (a preset of `suites.train.models` or a transformers
config.json), wrap it with the method's builder from the registry, and run real training steps
(forward, backward, `optimizer.step()`, `optimizer.zero_grad()`): one warm-up step so lazily created
optimizer state exists, then the measured window. With `--kind estimate` (the default) the model,
the method and every step live under FakeTensorMode: shapes are computed, nothing is allocated, so a
7B model is measured on a laptop in seconds. `--kind cpu` runs the same steps on real tensors (for
small models); both count live tensor storages with the same tracker (`suites.measure.meters`), so a small
config gives the same bytes both ways. `--kind cuda` runs them on the GPU and reads the allocator
(`max_memory_allocated`, active and reserved peaks, allocation retries over the window); each row then also
carries the estimate of the same configuration and its error against the allocator's peak, and the median
wall time of `--timed-steps` further steps run without any meter (`torch.cuda.synchronize` around each),
so one run validates the estimator and compares step times.

Policy (the published setups): pure low precision (`--dtype bfloat16`, or `bf16`: weights, gradients,
optimizer state and activations all bf16, no fp32 master copy; parameters a method builder creates in
another dtype are cast, see `cast_params`), no gradient checkpointing unless asked, scaled
dot-product attention. Periodic methods have their refresh period set to 1 for these runs so that the
measured window contains a refresh (DESIGN §5); the keys are in `REFRESH_KEYS`.

Fidelity: fake tensors live on the CPU device, so an estimate follows the CPU kernels' choices of what
to keep, with one exception chosen by `--kernels` and recorded as `kernel_policy`: `cuda-dropout` (the
default for estimates) keeps dropout's 1-byte bool mask as CUDA's fused kernel does, where the CPU kernel
keeps a noise tensor in the activation dtype (LoRA's dropout on every adapted layer's input: about 4 GiB
at 7B, micro-batch 8, seq 512); `cpu` keeps the CPU kernel's choice (the default, and the only honest one,
for `--kind cpu`, which measures a real CPU run). Not modelled: torch's AdamW runs single-tensor on CPU,
where on CUDA its foreach default adds parameter-sized temporaries in the step; allocator rounding and
library workspaces. Under FakeTensorMode a Python scalar read from a tensor (`.item()`, `bool(t)`) is a
placeholder (see `suites.measure.meters`).

Quantised methods (adam8bit, galore8bit, qlora) run bitsandbytes itself under FakeTensorMode: its ops have
fake implementations, and its code tables are computed for real (`suites.measure.meters.bitsandbytes_tables`);
tests/test_memory.py checks the estimate against a real CPU-tracked run byte for byte. A method that cannot
be measured here stops the run with one line naming it and the reason.

Distributed (`--nproc N --strategy ddp|fsdp`, estimates only): the per-rank peak of rank 0 of N data-parallel
ranks, measured like everything else (a real training step under FakeTensorMode), with PyTorch's fake
process group (`torch.testing._internal.distributed.fake_pg`: collectives take their shapes and move no data)
as torchtitan's memory estimator does. `--batch` is the GLOBAL micro-batch: each rank runs batch / N rows
(refused unless N divides it). Rows carry `world_size`, `strategy` and `rank_batch`; every byte is rank 0's.
  ddp   `DistributedDataParallel` with its defaults (25 MiB buckets, gradient_as_bucket_view=False: the
        reducer keeps its own flat copy of every trainable gradient, counted as "grads"; `ddp_bucket_bytes` in
        the row), wrapped around the model after the method's builder (the estimate equals a real two-process
        gloo run byte for byte: tests/test_memory_distributed.py). Two things of DDP cannot run on fake
        tensors and are replaced by memory-equivalent ones: the default C++ all-reduce hook (the fake group's
        future holds no tensor) by a Python hook that divides the bucket in place and completes with the same
        tensor, as the in-place all-reduce does; and the one-time bucket rebuild before the second step (it
        broadcasts bucket indices by reading their values) is skipped, so the buckets keep their construction-
        time grouping of the same gradient bytes. Construction-time sync (shape check, rank-0 broadcast) is
        off (`init_sync=False`): it reads values and ends before any step.
  fsdp  FSDP2 `fully_shard` on each decoder layer, then on the root (torchtitan's recipe; reshard after
        forward), then the method's builder on the sharded model, so the optimizer is built over the
        DTensor shards. "params" are this rank's shards (padded to ceil(dim0 / N) rows, as FSDP2 stores them)
        and the buffers; the gathered full weights of the layers being computed and the reduce-scatter
        inputs are temporaries ("other"); "grads" are the sharded gradients and the full gradients a layer
        holds until its reduce-scatter. FSDP2 frees gathered weights by `UntypedStorage.resize_`, which the
        dispatcher does not see; the tracker follows those resizes. A builder that changes the model (lora,
        oasis) is tried again on a fresh model with `cfg["shard"]`, a callable to call between changing the
        model and building the optimizer (`suites.train.distributed.build_sharded`: oasis, pca and lora call
        it).
A method that cannot run under a strategy (its builder replaces modules that FSDP already sharded, a
library refusing DTensors) gets a row saying so in one line (`error`), and the table goes on. Not with
`--loss chunked` (it calls the decoder and head around the wrapper's forward) or `--layerwise` (optimizer
steps inside backward race DDP's reducer and FSDP's reduce-scatter). Not modelled: NCCL's own buffers,
collectives' temporaries inside the communication library, and tensor, pipeline or context parallelism.

Generic memory tricks, offered to every method alike and recorded in the output:
  --loss chunked     the causal-LM loss over token chunks, never the whole batch's logits (suites.train.lean)
  --lean-blocks      RMSNorm and SwiGLU keep only their inputs for backward (suites.train.lean)
  --layerwise        optimizer steps inside backward, gradients freed at once (methods that support it)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from suites.core import cli, dtypes, files
from suites.measure.memory import KINDS, check_distributed, load_config, measure
from suites.measure.meters import KERNEL_POLICIES
from suites.measure.ranks import STRATEGIES
from suites.train import distributed

PROG = "python -m suites.memory"
GIB = 2**30
CATEGORY_COLS = ("params", "grads", "optimizer", "activations", "other")
POLICY_NOTES = {"cpu": "every op as the CPU kernel keeps it",
                "cuda-dropout": "dropout keeps a 1-byte mask as on CUDA; other ops as the CPU kernels"}


def run(args) -> dict:
    from suites.core.registry import resolve_methods

    methods = resolve_methods(args.methods)
    overrides = dict(args.set)
    if args.layerwise:
        overrides["layerwise"] = True
    rows = []
    for name in methods:
        try:
            row = measure(args.model, name, batch=args.batch, seq=args.seq, rank=args.rank, dtype=args.dtype,
                          checkpointing=args.checkpointing, kind=args.kind, attn=args.attn, loss=args.loss,
                          loss_chunk=args.loss_chunk, lean_blocks=args.lean_blocks, overrides=overrides,
                          kernel_policy=args.kernels,
                          timed_steps=args.timed_steps if args.kind == "cuda" else 0,
                          world_size=args.nproc, strategy=args.strategy)
            if args.kind == "cuda":  # the estimate of the same configuration, beside the allocator's peak
                est = measure(args.model, name, batch=args.batch, seq=args.seq, rank=args.rank,
                              dtype=args.dtype, checkpointing=args.checkpointing, kind="estimate",
                              attn=args.attn, loss=args.loss, loss_chunk=args.loss_chunk,
                              lean_blocks=args.lean_blocks, overrides=overrides, kernel_policy="cuda-dropout")
                row["estimate_bytes"] = est["peak_bytes"]
                row["estimate_error"] = round(est["peak_bytes"] / row["allocated_peak_bytes"] - 1, 4)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        except (RuntimeError, TypeError, AttributeError, AssertionError) as exc:  # NotImplementedError too
            # a library that cannot run this way (a kernel or fake implementation missing; FSDP2 asserts on
            # models it cannot shard): one line naming the method, never a traceback; OASIS_DEBUG=1 shows
            # where it failed
            if os.environ.get("OASIS_DEBUG") or (isinstance(exc, AssertionError) and not args.strategy):
                raise
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            if not args.strategy:
                raise ValueError(f"{name} cannot be measured here: {type(exc).__name__}: {first}") from None
            # under a strategy the table goes on: the row says why this method cannot run that way
            why = first if isinstance(exc, distributed.Unsupported) else f"{type(exc).__name__}: {first}"
            row = {"method": name, "peak_bytes": None, "world_size": args.nproc, "strategy": args.strategy,
                   "error": f"cannot run under {args.strategy}: {why}"}
        rows.append(row)
        if not args.quiet:
            done = (f"{row['peak_bytes'] / GIB:.3f} GiB ({row['wall_s']} s)" if row["peak_bytes"] is not None
                    else row["error"])
            print(f"  {name}: {done}", file=sys.stderr)
    measured = [r for r in rows if r["peak_bytes"] is not None]
    if not measured:
        raise ValueError(f"no method can run under {args.strategy}: " + "; ".join(
            f"{r['method']}: {r['error']}" for r in rows))
    adam = next((r for r in measured if r["method"] == "adam"), None)
    for r in rows:
        r["ratio_to_adam"] = (None if adam is None or r["peak_bytes"] is None
                              else round(r["peak_bytes"] / adam["peak_bytes"], 4))
        if adam is not None and r.get("step_s_median") and adam.get("step_s_median"):
            r["step_time_to_adam"] = round(r["step_s_median"] / adam["step_s_median"], 4)
    config = {"model": args.model, "batch": args.batch, "seq": args.seq, "rank": args.rank,
              "dtype": dtypes.canonical(args.dtype), "checkpointing": args.checkpointing, "attn": args.attn,
              "loss": args.loss,
              "loss_chunk": args.loss_chunk if args.loss == "chunked" else None, "layerwise": args.layerwise,
              "lean_blocks": args.lean_blocks,
              "kind": args.kind, "kernel_policy": measured[0]["kernel_policy"], "set": overrides,
              "world_size": args.nproc, "strategy": args.strategy,
              "peak": "per rank (rank 0)" if args.strategy else "one process",
              "torch": torch.__version__}
    if args.strategy:
        config["rank_batch"] = args.batch // args.nproc
    if args.kind == "cuda":
        config.update(gpu=rows[0]["gpu"], timed_steps=args.timed_steps, estimate_kernel_policy="cuda-dropout")
    return {"config": config, "results": rows}


def format_table(report: dict, markdown: bool = False) -> str:
    """The results as a table; under a strategy the peak column is per rank and a method that cannot run
    that way is one row saying why."""
    big = max(r["peak_bytes"] for r in report["results"] if r["peak_bytes"] is not None) >= GIB
    unit, scale = ("GiB", GIB) if big else ("MiB", 2**20)
    cuda = report["config"]["kind"] == "cuda"
    per_rank = bool(report["config"].get("strategy"))
    cols = ("method", f"peak/rank {unit}" if per_rank else f"peak {unit}", *CATEGORY_COLS, "/adam", "tricks")
    if cuda:
        cols += (f"allocated {unit}", f"reserved {unit}", "retries", f"estimate {unit}", "estimate error",
                 "step ms", "step /adam")
    lines = []
    for r in report["results"]:
        if r["peak_bytes"] is None:
            lines.append((r["method"], "-", *("-" for _ in CATEGORY_COLS), "-", r["error"]))
            continue
        b = r["breakdown"]
        tricks = [k if k != "loss" else f"loss={v}" for k, v in r["tricks"].items()
                  if (v if k != "loss" else v != "full")]
        line = (r["method"], f"{r['peak_bytes'] / scale:.2f}",
                *(f"{b[k] / scale:.2f}" for k in CATEGORY_COLS),
                "-" if r["ratio_to_adam"] is None else f"{r['ratio_to_adam']:.3f}",
                ",".join(tricks) or "-")
        if cuda:
            step = r.get("step_s_median")
            line += (f"{r['allocated_peak_bytes'] / scale:.2f}", f"{r['reserved_bytes'] / scale:.2f}",
                     str(r["alloc_retries"]), f"{r['estimate_bytes'] / scale:.2f}",
                     f"{100 * r['estimate_error']:+.1f}%", "-" if step is None else f"{1000 * step:.1f}",
                     f"{r['step_time_to_adam']:.3f}" if r.get("step_time_to_adam") else "-")
        lines.append(line)
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    if per_rank:  # the last column: an error row's reason runs on without widening the others' column
        widths[-1] = max([len(cols[-1])] + [len(line[-1]) for line in lines if line[1] != "-"])
    fmt = "  ".join(f"{{:{'<' if i in (0, 8) else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*cols)] + [fmt.format(*line) for line in lines])


def parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a preset or named model of suites.train.models (llama-cpu, smollm2-135m, ...), "
                        "a GGUF file, a Hugging Face model folder, a hub id, or a config.json")
    p.add_argument("--methods", default="all", help="'all' (the six mission methods) or a,b,...")
    p.add_argument("--batch", type=cli.positive_int, default=8,
                   help="micro-batch size (sequences); with --nproc the global one, batch / nproc per rank")
    p.add_argument("--seq", type=cli.positive_int, default=512, help="sequence length (tokens)")
    p.add_argument("--rank", type=cli.positive_int, default=32, help="rank of the low-rank methods")
    p.add_argument("--dtype", type=cli.dtype_name, default="bfloat16",
                   metavar="{" + ",".join(dtypes.CANONICAL) + "}",
                   help="dtype of the whole model and its training state (pure, no master copy); "
                        f"also {', '.join(dtypes.ALIASES)}")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    p.add_argument("--loss", choices=("full", "chunked"), default="full",
                   help="full: the model's own loss over the whole batch's logits; "
                        "chunked: suites.train.lean")
    p.add_argument("--loss-chunk", type=cli.positive_int, default=256,
                   help="tokens per chunk for --loss chunked")
    p.add_argument("--lean-blocks", action="store_true",
                   help="RMSNorm and SwiGLU keep only their inputs for backward (suites.train.lean)")
    p.add_argument("--layerwise", action="store_true",
                   help="optimizer steps inside backward (sets layerwise=true for methods that have it)")
    p.add_argument("--kind", choices=KINDS, default="estimate",
                   help="estimate: FakeTensorMode, nothing allocated; cpu: real tensors (small models); "
                        "cuda: real steps on the GPU, the allocator's peaks beside the estimate")
    p.add_argument("--timed-steps", type=cli.nonnegative_int, default=10,
                   help="--kind cuda: steps timed after the window, without any meter (median reported)")
    p.add_argument("--kernels", choices=KERNEL_POLICIES, default=None,
                   help="kernel policy (recorded as kernel_policy): cuda-dropout keeps dropout's 1-byte mask "
                        "as CUDA does (default for estimates); cpu keeps the CPU kernels' choice (default "
                        "for --kind cpu)")
    p.add_argument("--set", action="append", type=cli.key_value, default=[], metavar="KEY=VALUE",
                   help="a method hyper-parameter (JSON value), e.g. --set subspace_lr=0.1")
    p.add_argument("--nproc", type=cli.positive_int, default=1,
                   help="data-parallel ranks (with --strategy): the peak of one rank, estimated with a fake "
                        "process group")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="ddp: DistributedDataParallel (default buckets); fsdp: FSDP2 fully_shard per decoder "
                        "layer and root")
    p.add_argument("--json", type=Path, help="also write the results as JSON here (checked before measuring)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--quiet", action="store_true", help="no per-method progress on stderr")
    return p


def _main(argv) -> int:
    args = parser().parse_args(argv)
    try:
        if args.json:
            files.check_output_file(args.json, "--json")
        from suites.core.registry import resolve_methods

        resolve_methods(args.methods)
        check_distributed(args.batch, args.nproc, args.strategy, args.kind, args.loss,
                           {"layerwise": args.layerwise, **dict(args.set)})
        load_config(args.model)
        report = run(args)
    except ValueError as exc:  # OutputError, unknown method or model, a method's bad hyper-parameter
        raise cli.UsageError(str(exc)) from None
    print(format_table(report, markdown=args.markdown))
    policy = report["config"]["kernel_policy"]
    if policy == "cuda":
        print("kernel policy: cuda (the CUDA kernels; estimates beside it use cuda-dropout); estimate "
              "error = estimate / max_memory_allocated - 1; step ms = median of --timed-steps unmetered "
              "steps")
    else:
        print(f"kernel policy: {policy} ({POLICY_NOTES[policy]})")
    if args.strategy:
        print(f"{args.strategy}, {args.nproc} ranks: peak and categories are one rank's (rank 0), "
              f"micro-batch {args.batch // args.nproc} per rank ({args.batch} global); fake process group")
    if args.json:
        files.write_json(args.json, report)
    return 0


def main(argv=None) -> int:
    return cli.cli_main(PROG, _main, argv)


def write_json(obj, path: Path) -> None:
    """`suites.core.files.write_json` with the arguments the other way round, for `suites.memcheck` until it
    calls `suites.core.files` itself."""
    files.write_json(path, obj)


if __name__ == "__main__":
    sys.exit(main())
