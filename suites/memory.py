"""Peak training memory of every method at any model scale, measured by running real training steps.

    python -m suites.memory --model llama-2-7b --methods all --batch 8 --seq 512 --rank 32
    python -m suites.memory --model llama-2-7b --methods all --batch 64 --nproc 8 --strategy fsdp

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
        model and building the optimizer (`suites.distributed.build_sharded`: oasis, pca and lora call it).
A method that cannot run under a strategy (its builder replaces modules that FSDP already sharded, a
library refusing DTensors) gets a row saying so in one line (`error`), and the table goes on. Not with
`--loss chunked` (it calls the decoder and head around the wrapper's forward) or `--layerwise` (optimizer
steps inside backward race DDP's reducer and FSDP's reduce-scatter). Not modelled: NCCL's own buffers,
collectives' temporaries inside the communication library, and tensor, pipeline or context parallelism.

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

from suites import cli, distributed, dtypes, files, lean
from suites.meters import (
    KERNEL_POLICIES,
    DistributedTracker,
    EstimateMeter,
    Meter,
    fake_construction,
    make_meter,
)
from suites.patching import patched

PROG = "python -m suites.memory"
MASK_TRACING_CHECK = "is_tracing"  # the transformers.masking_utils function `_masks_as_in_real_runs` wraps
KINDS = ("estimate", "cpu", "cuda")
# hyper-parameters that set how often a basis is recomputed: 1 puts a refresh inside the window
REFRESH_KEYS = {"update_proj_gap": 1, "refresh_every": 1, "update_every": 1}
COMMON = {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "seed": 0}
GIB = 2**30
STRATEGIES = ("ddp", "fsdp")
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
    from suites.registry import method_defaults, method_options

    defaults = method_defaults(name)
    options = method_options(name)  # lora_targets, use_dora: in the config when set, as in the harness
    cfg = {**defaults, **COMMON, "rank": rank}
    cfg.update({k: v for k, v in REFRESH_KEYS.items() if k in defaults})
    cfg.update({k: v for k, v in overrides.items() if k in defaults or k in options or k in COMMON})
    return cfg


def measure(model: str, method: str, *, batch: int, seq: int, rank: int, dtype: str = "bfloat16",
            checkpointing: bool = False, kind: str = "estimate", attn: str = "sdpa", loss: str = "full",
            loss_chunk: int = 256, lean_blocks: bool = False, window: int = 1,
            overrides: dict | None = None, kernel_policy: str | None = None, timed_steps: int = 0,
            world_size: int = 1, strategy: str | None = None) -> dict:
    """Peak memory of `window` training steps of `method` after one warm-up step; one result row.

    `dtype` is any name of `suites.dtypes` (`bf16` or `bfloat16`). `kernel_policy` (see `suites.meters`):
    None means "cuda-dropout" for estimates and "cpu" for real runs; `kind="cuda"` runs the CUDA kernels.
    `timed_steps` (cuda only): further steps after the window, outside any meter, each timed alone.
    `strategy` ("ddp" | "fsdp", see the module docstring): rank 0 of `world_size` ranks, `batch` global. An
    estimate makes its own fake process group; `kind="cpu"` runs inside one its caller initialised (a real
    gloo group of `world_size` processes). A method the strategy cannot run raises
    `suites.distributed.Unsupported`.
    """
    from suites.registry import build_method

    rank_batch = _check_distributed(batch, world_size, strategy, kind, loss, overrides)

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
    with _process_group(world_size, fake) if strategy else contextlib.nullcontext() as mesh:
        # fake tensors for an estimate; on the GPU, factory calls without a device (in the model and in method
        # builders) land on it
        with fake_construction() if fake else torch.device(device) as fake_mode:
            def make_net():
                if not fake and _has_weights(model):
                    net = load_weights(model, torch_dtype, attn, checkpointing)
                else:
                    net = build_model(config, torch_dtype, attn, checkpointing)
                net.to(device)
                if lean_blocks:
                    lean.apply_lean_activations(net)
                return net

            shards = None
            if strategy == "fsdp":
                net, optimizer, shards = distributed.build_sharded(
                    method, make_net, cfg, mesh, before_shard=lambda m: cast_params(m, torch_dtype))
            else:
                net, optimizer = build_method(method, make_net(), cfg)
                cast_params(net, torch_dtype)
            tracker = DistributedTracker(net, optimizer, shards, fake) if strategy else None
            model_call = _wrap_ddp(net, tracker, world_size, fake) if strategy == "ddp" else net
            batch_ = {k: v.to(device) for k, v in make_batch(vocab, rank_batch, seq).items()}
        if tracker is None:
            meter = make_meter(kind, net, optimizer, kernel_policy)
        else:
            meter = (_DistributedEstimateMeter(net, optimizer, kernel_policy, fake_mode) if fake
                     else Meter(net, optimizer, kernel_policy))
            meter.tracker = tracker
        loss_fn = lean.causal_lm_loss if loss == "chunked" else lean.model_loss
        after_backward = {}

        def step():  # what the harness does (suites.recipe.optimizer_step), minus timing and logging
            value = loss_fn(model_call, batch_, chunk_tokens=loss_chunk)
            value.backward()
            if tracker is not None and tracker.windowed:  # the whole gradient exists: state at its largest
                after_backward.update(tracker.classify())
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
           "world_size": world_size, "strategy": strategy, "rank_batch": rank_batch,
           "tricks": {"loss": loss, "lean_blocks": lean_blocks,
                      "layerwise": bool(cfg.get("layerwise", False)), "checkpointing": checkpointing},
           "method_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}}
    if strategy:
        # params, grads and optimizer state right after the window's backward (the gradient complete; for
        # fsdp the rank's shards, for ddp the gradients and their bucket copy)
        row["after_backward"] = {k: after_backward[k] for k in ("params", "grads", "optimizer")}
        if strategy == "ddp":
            row["ddp_bucket_bytes"] = tracker.bucket_bytes()
            row["ddp"] = {"gradient_as_bucket_view": False, "bucket_cap_mb": 25, "init_sync": not fake,
                          "bucket_rebuild": not fake}
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


def _check_distributed(batch: int, world_size: int, strategy: str | None, kind: str, loss: str,
                       overrides: dict | None) -> int:
    """The per-rank micro-batch; ValueError (one line) for a combination that cannot be measured."""
    if strategy is None:
        if world_size != 1:
            raise ValueError(f"--nproc {world_size} needs --strategy ({' or '.join(STRATEGIES)})")
        return batch
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if kind == "cuda":
        raise ValueError("--strategy is measured as an estimate (a fake process group); --kind cuda runs one "
                         "process on one GPU")
    if batch % world_size:
        raise ValueError(f"--batch {batch} is the global micro-batch and must be a multiple of --nproc "
                         f"{world_size} (each rank runs batch / nproc rows)")
    if loss == "chunked":
        raise ValueError("--loss chunked calls the decoder and head around the DDP/FSDP wrapper's forward; "
                         "use --loss full with --strategy")
    if (overrides or {}).get("layerwise"):
        raise ValueError("--layerwise steps the optimizer inside backward, racing DDP's reducer and FSDP's "
                         "reduce-scatter; not with --strategy")
    return batch // world_size


@contextlib.contextmanager
def _process_group(world_size: int, fake: bool):
    """The process group of a distributed measurement; yields the 1-D device mesh FSDP2 shards over.

    An estimate initialises PyTorch's fake group (rank 0 of `world_size`; collectives move nothing) and
    destroys it afterwards; a real run (`kind="cpu"`) uses the group its caller initialised."""
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        if not fake:
            raise ValueError("a real distributed measurement runs inside an initialised process group "
                             "(one process per rank); estimates make their own fake one")
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        if dist.get_world_size() != world_size:
            raise ValueError(f"the process group has {dist.get_world_size()} ranks, not {world_size}")
        yield distributed.device_mesh("cpu")  # outside FakeTensorMode, as torchtitan builds it
    finally:
        if own:
            dist.destroy_process_group()


def _wrap_ddp(net, tracker, world_size: int, fake: bool):
    """`DistributedDataParallel` with its defaults around `net`, its gradient buckets reported to `tracker`.

    The communication hook does what DDP's default one does (divide the bucket by the world size, all-reduce
    it in place) and tells the tracker which storages are buckets. Under the fake group the all-reduce's
    future holds no tensor, so the hook completes with the bucket itself; and the bucket rebuild before the
    second step, which reads bucket indices' values, is skipped (module docstring)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(net, init_sync=not fake)

    def hook(_state, bucket):
        tensor = bucket.buffer()
        tracker.add_bucket(tensor)
        tensor.div_(world_size)
        if fake:
            future = torch.futures.Future()
            future.set_result(tensor)
            return future
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda _fut: tensor)

    ddp.register_comm_hook(None, hook)
    if fake:
        ddp.reducer = _NoRebuild(ddp.reducer)
    return ddp


class _NoRebuild:
    """DDP's reducer as DDP's Python code calls it, except that the one-time bucket rebuild is skipped."""

    def __init__(self, reducer):
        self._reducer = reducer

    def __getattr__(self, name):
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> bool:
        return False


class _DistributedEstimateMeter(EstimateMeter):
    """The estimate meter for a model of DTensors (its fake mode is given, not found on the parameters)."""

    def __init__(self, model, optimizer, kernel_policy, fake_mode):
        Meter.__init__(self, model, optimizer, kernel_policy or "cuda-dropout")
        self.fake_mode = fake_mode


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


def _key_value(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return key, value


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
    p.add_argument("--batch", type=cli.positive_int, default=8,
                   help="micro-batch size (sequences); with --nproc the global one, batch / nproc per rank")
    p.add_argument("--seq", type=cli.positive_int, default=512, help="sequence length (tokens)")
    p.add_argument("--rank", type=cli.positive_int, default=32, help="rank of the low-rank methods")
    p.add_argument("--dtype", type=_dtype, default="bfloat16", metavar="{" + ",".join(dtypes.CANONICAL) + "}",
                   help="dtype of the whole model and its training state (pure, no master copy); "
                        f"also {', '.join(dtypes.ALIASES)}")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (non-reentrant)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa", help="attention implementation")
    p.add_argument("--loss", choices=("full", "chunked"), default="full",
                   help="full: the model's own loss over the whole batch's logits; chunked: suites.lean")
    p.add_argument("--loss-chunk", type=cli.positive_int, default=256,
                   help="tokens per chunk for --loss chunked")
    p.add_argument("--lean-blocks", action="store_true",
                   help="RMSNorm and SwiGLU keep only their inputs for backward (suites.lean)")
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
    p.add_argument("--set", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
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
        from suites.registry import resolve_methods

        resolve_methods(args.methods)
        _check_distributed(args.batch, args.nproc, args.strategy, args.kind, args.loss,
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
    """`suites.files.write_json` with the arguments the other way round, for `suites.memcheck` until it
    calls `suites.files` itself."""
    files.write_json(path, obj)


if __name__ == "__main__":
    sys.exit(main())
