"""Peak training memory of every method at any model scale, measured by running real training steps.

    python -m suites.memory --model llama-2-7b --methods all --batch 8 --seq 512 --rank 32

For each method: build the model from its config (a preset of `suites.models` or a transformers
config.json), wrap it with the method's builder from the registry, and run real training steps
(forward, backward, `optimizer.step()`, `optimizer.zero_grad()`): one warm-up step so lazily created
optimizer state exists, then the measured window. With `--kind estimate` (the default) the model,
the method and every step live under FakeTensorMode: shapes are computed, nothing is allocated, so a
7B model is measured on a laptop in seconds. `--kind cpu` runs the same steps on real tensors (for
small models); both count live tensor storages with the same tracker (`suites.meters`), so a small
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
placeholder (see `suites.meters`).

Quantised methods (adam8bit, galore8bit, qlora) run bitsandbytes itself under FakeTensorMode: its ops have
fake implementations, and its code tables are computed for real (`suites.meters.bitsandbytes_tables`);
tests/test_memory.py checks the estimate against a real CPU-tracked run byte for byte. A method that cannot
be measured here stops the run with one line naming it and the reason.

Generic memory tricks, offered to every method alike and recorded in the output:
  --loss chunked     the causal-LM loss over token chunks, never the whole batch's logits (suites.lean)
  --lean-blocks      RMSNorm and SwiGLU keep only their inputs for backward (suites.lean)
  --layerwise        optimizer steps inside backward, gradients freed at once (methods that support it)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from suites import cli, dtypes, files, lean
from suites.meters import KERNEL_POLICIES, fake_construction, make_meter
from suites.patching import patched

PROG = "python -m suites.memory"
MASK_TRACING_CHECK = "is_tracing"  # the transformers.masking_utils function `_masks_as_in_real_runs` wraps
KINDS = ("estimate", "cpu", "cuda")
# hyper-parameters that set how often a basis is recomputed: 1 puts a refresh inside the window
REFRESH_KEYS = {"update_proj_gap": 1, "refresh_every": 1, "update_every": 1}
COMMON = {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "seed": 0}
GIB = 2**30
CATEGORY_COLS = ("params", "grads", "optimizer", "activations", "other")
POLICY_NOTES = {"cpu": "every op as the CPU kernel keeps it",
                "cuda-dropout": "dropout keeps a 1-byte mask as on CUDA; other ops as the CPU kernels"}


def load_config(model: str):
    """A transformers config from a model spec of `suites.models` (a preset, `smollm2-135m`, a GGUF file,
    a Hugging Face folder, a hub id) or a config.json file; ValueError (one line) when it cannot be had."""
    from suites.models import load_config_json, model_config

    path = Path(model)
    if path.suffix == ".json" and path.is_file():
        return load_config_json(path)
    return model_config(model)


def load_weights(model: str, dtype: torch.dtype, attn: str, checkpointing: bool):
    """The real pretrained model of a spec with weights (for `--kind cpu`: a real training step of the real
    model; its bytes equal those of a random init of the same config)."""
    from transformers import AutoModelForCausalLM

    from suites.models import enable_checkpointing, resolve, weights_dir

    net = AutoModelForCausalLM.from_pretrained(weights_dir(resolve(model)), dtype=dtype,
                                               attn_implementation=attn)
    if checkpointing:
        enable_checkpointing(net)
    net.train()
    return net


def build_model(config, dtype: torch.dtype, attn: str, checkpointing: bool):
    """The randomly initialised causal LM of `config` in `dtype` (values are irrelevant to memory)."""
    from transformers import AutoModelForCausalLM

    from suites.models import enable_checkpointing

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model = model.to(dtype=dtype)
    if checkpointing:
        enable_checkpointing(model)
    model.train()
    return model


def make_batch(vocab: int, batch: int, seq: int) -> dict:
    """A full-length batch like the harness': input_ids, attention_mask (ones) and labels (a copy)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def cast_params(model, dtype: torch.dtype) -> None:
    """Pure `dtype`: floating parameters a builder made in another dtype are cast in place (peft, for one,
    upcasts LoRA adapters of a bf16 model to fp32 by default). Optimizer state is created lazily from the
    parameters, so it follows. Buffers, method state that is not a parameter (e.g. OASIS bases, fp32
    by design) and parameters marked `keep_dtype` (OASIS's float32 gradient carriers) are left alone."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype and not getattr(p, "keep_dtype", False):
                p.data = p.data.to(dtype)


def method_config(name: str, rank: int, overrides: dict) -> dict:
    from suites.registry import method_defaults

    defaults = method_defaults(name)
    cfg = {**defaults, **COMMON, "rank": rank}
    cfg.update({k: v for k, v in REFRESH_KEYS.items() if k in defaults})
    cfg.update({k: v for k, v in overrides.items() if k in defaults or k in COMMON})
    return cfg


def measure(model: str, method: str, *, batch: int, seq: int, rank: int, dtype: str = "bfloat16",
            checkpointing: bool = False, kind: str = "estimate", attn: str = "sdpa", loss: str = "full",
            loss_chunk: int = 256, lean_blocks: bool = False, window: int = 1,
            overrides: dict | None = None, kernel_policy: str | None = None, timed_steps: int = 0) -> dict:
    """Peak memory of `window` training steps of `method` after one warm-up step; one result row.

    `dtype` is any name of `suites.dtypes` (`bf16` or `bfloat16`). `kernel_policy` (see `suites.meters`):
    None means "cuda-dropout" for estimates and "cpu" for real runs; `kind="cuda"` runs the CUDA kernels.
    `timed_steps` (cuda only): further steps after the window, outside any meter, each timed alone.
    """
    from suites.registry import build_method

    torch_dtype = dtypes.torch_dtype(dtype)
    cuda = kind == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError("--kind cuda needs a CUDA device")
        if kernel_policy not in (None, "cuda"):
            raise ValueError(f"--kind cuda runs the CUDA kernels; kernel policy {kernel_policy!r} "
                             "does not apply")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        if kernel_policy is None:
            kernel_policy = "cuda-dropout" if kind == "estimate" else "cpu"
        if kernel_policy not in KERNEL_POLICIES:
            raise ValueError(f"unknown kernel policy {kernel_policy!r}; "
                             f"choose from {', '.join(KERNEL_POLICIES)}")
        device = torch.device("cpu")

    config = load_config(model)
    cfg = method_config(method, rank, dict(overrides or {}))
    fake = kind == "estimate"
    vocab = config.vocab_size
    t0 = time.perf_counter()
    # fake tensors for an estimate; on the GPU, factory calls without a device (in the model and in method
    # builders) land on it
    with fake_construction() if fake else torch.device(device):
        if not fake and _has_weights(model):
            net = load_weights(model, torch_dtype, attn, checkpointing)
        else:
            net = build_model(config, torch_dtype, attn, checkpointing)
        net.to(device)
        if lean_blocks:
            lean.apply_lean_activations(net)
        net, optimizer = build_method(method, net, cfg)
        cast_params(net, torch_dtype)
        batch_ = {k: v.to(device) for k, v in make_batch(vocab, batch, seq).items()}
    meter = make_meter(kind, net, optimizer, kernel_policy)
    loss_fn = lean.causal_lm_loss if loss == "chunked" else lean.model_loss

    def step():  # what the harness does (suites.recipe.optimizer_step), minus timing and logging
        value = loss_fn(net, batch_, chunk_tokens=loss_chunk)
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with meter, _masks_as_in_real_runs() if fake else contextlib.nullcontext():
        step()
        meter.start_window()
        for _ in range(window):
            step()
    rec = meter.result()
    row = {"method": method, "peak_bytes": rec["peak_bytes"], "breakdown": rec["breakdown"],
           "source": rec["source"], "kernel_policy": rec["kernel_policy"],
           "tricks": {"loss": loss, "lean_blocks": lean_blocks,
                      "layerwise": bool(cfg.get("layerwise", False)), "checkpointing": checkpointing},
           "method_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}}
    if cuda:
        times = _time_steps(step, timed_steps, device)
        row.update({k: rec[k] for k in ("allocated_peak_bytes", "active_peak_bytes", "reserved_bytes",
                                        "alloc_retries")},
                   step_s_median=round(statistics.median(times), 5) if times else None,
                   step_s_all=[round(t, 5) for t in times], gpu=torch.cuda.get_device_name(device))
        net = optimizer = batch_ = meter = None  # the next method starts from an empty allocator
        torch.cuda.empty_cache()
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def _time_steps(step, count: int, device) -> list[float]:
    """Wall seconds of `count` further steps, each alone (the GPU synchronised before and after)."""
    times = []
    for _ in range(count):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def _has_weights(model: str) -> bool:
    from suites.models import carries_weights

    path = Path(model)
    if path.is_dir():  # a folder may hold only a config.json (shapes to measure, no weights)
        return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return carries_weights(model) and path.suffix != ".json"


@contextlib.contextmanager
def _masks_as_in_real_runs():
    """transformers treats a fake tensor as "tracing" and then always materialises a (B, 1, S, S) attention
    mask, where a real run with an all-ones attention_mask passes none and lets SDPA apply causality
    itself (the flash-attention path). The check that reads the mask's values is answered by the
    tracker's placeholder (True: all ones), which is what the batches measured here hold."""
    import transformers.masking_utils as masking
    from torch._subclasses.fake_tensor import FakeTensor

    def is_tracing(tensor=None):
        return original(None if isinstance(tensor, FakeTensor) else tensor)

    why = ("an estimate must build the attention masks a real run builds; without it every estimate "
           "holds a (batch, 1, seq, seq) mask that a real run with an all-ones attention_mask never makes")
    with patched(masking, MASK_TRACING_CHECK, is_tracing, why=why) as original:  # bound before any call
        yield


def run(args) -> dict:
    from suites.registry import resolve_methods

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
                          timed_steps=args.timed_steps if args.kind == "cuda" else 0)
            if args.kind == "cuda":  # the estimate of the same configuration, beside the allocator's peak
                est = measure(args.model, name, batch=args.batch, seq=args.seq, rank=args.rank,
                              dtype=args.dtype, checkpointing=args.checkpointing, kind="estimate",
                              attn=args.attn, loss=args.loss, loss_chunk=args.loss_chunk,
                              lean_blocks=args.lean_blocks, overrides=overrides, kernel_policy="cuda-dropout")
                row["estimate_bytes"] = est["peak_bytes"]
                row["estimate_error"] = round(est["peak_bytes"] / row["allocated_peak_bytes"] - 1, 4)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        except (RuntimeError, TypeError, AttributeError) as exc:  # NotImplementedError is a RuntimeError
            # a library that cannot run this way (a kernel or fake implementation missing): one line
            # naming the method, never a traceback; OASIS_DEBUG=1 shows where it failed
            if os.environ.get("OASIS_DEBUG"):
                raise
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            raise ValueError(f"{name} cannot be measured here: {type(exc).__name__}: {first}") from None
        rows.append(row)
        if not args.quiet:
            print(f"  {name}: {row['peak_bytes'] / GIB:.3f} GiB ({row['wall_s']} s)", file=sys.stderr)
    adam = next((r for r in rows if r["method"] == "adam"), None)
    for r in rows:
        r["ratio_to_adam"] = None if adam is None else round(r["peak_bytes"] / adam["peak_bytes"], 4)
        if adam is not None and r.get("step_s_median") and adam.get("step_s_median"):
            r["step_time_to_adam"] = round(r["step_s_median"] / adam["step_s_median"], 4)
    config = {"model": args.model, "batch": args.batch, "seq": args.seq, "rank": args.rank,
              "dtype": dtypes.canonical(args.dtype), "checkpointing": args.checkpointing, "attn": args.attn,
              "loss": args.loss,
              "loss_chunk": args.loss_chunk if args.loss == "chunked" else None, "layerwise": args.layerwise,
              "lean_blocks": args.lean_blocks,
              "kind": args.kind, "kernel_policy": rows[0]["kernel_policy"], "set": overrides,
              "torch": torch.__version__}
    if args.kind == "cuda":
        config.update(gpu=rows[0]["gpu"], timed_steps=args.timed_steps, estimate_kernel_policy="cuda-dropout")
    return {"config": config, "results": rows}


def format_table(report: dict, markdown: bool = False) -> str:
    big = max(r["peak_bytes"] for r in report["results"]) >= GIB
    unit, scale = ("GiB", GIB) if big else ("MiB", 2**20)
    cuda = report["config"]["kind"] == "cuda"
    cols = ("method", f"peak {unit}", *CATEGORY_COLS, "/adam", "tricks")
    if cuda:
        cols += (f"allocated {unit}", f"reserved {unit}", "retries", f"estimate {unit}", "estimate error",
                 "step ms", "step /adam")
    lines = []
    for r in report["results"]:
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
    fmt = "  ".join(f"{{:{'<' if i in (0, 8) else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*cols)] + [fmt.format(*line) for line in lines])


def _key_value(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return key, value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _dtype(text: str) -> str:
    try:
        return dtypes.canonical(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a preset or named model of suites.models (llama-cpu, smollm2-135m, ...), a GGUF "
                        "file, a Hugging Face model folder, a hub id, or a config.json")
    p.add_argument("--methods", default="all", help="'all' (the six mission methods) or a,b,...")
    p.add_argument("--batch", type=_positive, default=8, help="micro-batch size (sequences)")
    p.add_argument("--seq", type=_positive, default=512, help="sequence length (tokens)")
    p.add_argument("--rank", type=_positive, default=32, help="rank of the low-rank methods")
    p.add_argument("--dtype", type=_dtype, default="bfloat16", metavar="{" + ",".join(dtypes.CANONICAL) + "}",
                   help="dtype of the whole model and its training state (pure, no master copy); "
                        f"also {', '.join(dtypes.ALIASES)}")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    p.add_argument("--loss", choices=("full", "chunked"), default="full",
                   help="full: the model's own loss over the whole batch's logits; chunked: suites.lean")
    p.add_argument("--loss-chunk", type=_positive, default=256, help="tokens per chunk for --loss chunked")
    p.add_argument("--lean-blocks", action="store_true",
                   help="RMSNorm and SwiGLU keep only their inputs for backward (suites.lean)")
    p.add_argument("--layerwise", action="store_true",
                   help="optimizer steps inside backward (sets layerwise=true for methods that have it)")
    p.add_argument("--kind", choices=KINDS, default="estimate",
                   help="estimate: FakeTensorMode, nothing allocated; cpu: real tensors (small models); "
                        "cuda: real steps on the GPU, the allocator's peaks beside the estimate")
    p.add_argument("--timed-steps", type=_nonnegative, default=10,
                   help="--kind cuda: steps timed after the window, without any meter (median reported)")
    p.add_argument("--kernels", choices=KERNEL_POLICIES, default=None,
                   help="kernel policy (recorded as kernel_policy): cuda-dropout keeps dropout's 1-byte mask "
                        "as CUDA does (default for estimates); cpu keeps the CPU kernels' choice (default "
                        "for --kind cpu)")
    p.add_argument("--set", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="a method hyper-parameter (JSON value), e.g. --set subspace_lr=0.1")
    p.add_argument("--json", type=Path, help="also write the results as JSON here (checked before measuring)")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--quiet", action="store_true", help="no per-method progress on stderr")
    return p


def _main(argv) -> int:
    args = parser().parse_args(argv)
    try:
        if args.json:
            files.check_output_file(args.json, "--json")
        from suites.registry import resolve_methods

        resolve_methods(args.methods)
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
    if args.json:
        files.write_json(args.json, report)
    return 0


def main(argv=None) -> int:
    return cli.cli_main(PROG, _main, argv)


def write_json(obj, path: Path) -> None:
    """`suites.files.write_json` with the arguments the other way round, for `suites.memcheck` until it
    calls `suites.files` itself."""
    files.write_json(path, obj)


if __name__ == "__main__":
    sys.exit(main())
