"""Peak training memory of one method, measured by running real training steps (what `python -m suites.memory`
prints, one row per method; its --help says how): under FakeTensorMode (an estimate, nothing allocated), on
real CPU tensors, or on the GPU with the allocator's peaks (`kind="cuda"`). The tracker and meters are
`suites.measure.meters`; the data-parallel pieces (fake process group, DDP hook) `suites.measure.ranks`."""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import torch

from suites.core import dtypes
from suites.core.patching import patched
from suites.measure.meters import KERNEL_POLICIES, Meter, fake_construction, make_meter
from suites.measure.ranks import STRATEGIES, DistributedEstimateMeter, process_group, wrap_ddp
from suites.measure.trackers import DistributedTracker
from suites.train import distributed, lean

MASK_TRACING_CHECK = "is_tracing"  # the transformers.masking_utils function `_masks_as_in_real_runs` wraps
KINDS = ("estimate", "cpu", "cuda")
# hyper-parameters that set how often a basis is recomputed: 1 puts a refresh inside the window
REFRESH_KEYS = {"update_proj_gap": 1, "refresh_every": 1, "update_every": 1}
COMMON = {"lr": 1e-4, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "seed": 0}


def load_config(model: str):
    """A transformers config from a model spec of `suites.train.models` (a preset, `smollm2-135m`, a GGUF
    file,
    a Hugging Face folder, a hub id) or a config.json file; ValueError (one line) when it cannot be had."""
    from suites.train.models import load_config_json, model_config

    path = Path(model)
    if path.suffix == ".json" and path.is_file():
        return load_config_json(path)
    return model_config(model)


def load_weights(model: str, dtype: torch.dtype, attn: str, checkpointing: bool):
    """The real pretrained model of a spec with weights (for `--kind cpu`: a real training step of the real
    model; its bytes equal those of a random init of the same config)."""
    from transformers import AutoModelForCausalLM

    from suites.train.models import enable_checkpointing, resolve, weights_dir

    net = AutoModelForCausalLM.from_pretrained(weights_dir(resolve(model)), dtype=dtype,
                                               attn_implementation=attn)
    if checkpointing:
        enable_checkpointing(net)
    net.train()
    return net


def build_model(config, dtype: torch.dtype, attn: str, checkpointing: bool):
    """The randomly initialised causal LM of `config` in `dtype` (values are irrelevant to memory)."""
    from transformers import AutoModelForCausalLM

    from suites.train.models import enable_checkpointing

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
    from suites.core.registry import method_defaults, method_options

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

    `dtype` is any name of `suites.core.dtypes` (`bf16` or `bfloat16`). `kernel_policy` (see
    `suites.measure.meters`):
    None means "cuda-dropout" for estimates and "cpu" for real runs; `kind="cuda"` runs the CUDA kernels.
    `timed_steps` (cuda only): further steps after the window, outside any meter, each timed alone.
    `strategy` ("ddp" | "fsdp", see the module docstring): rank 0 of `world_size` ranks, `batch` global. An
    estimate makes its own fake process group; `kind="cpu"` runs inside one its caller initialised (a real
    gloo group of `world_size` processes). A method the strategy cannot run raises
    `suites.train.distributed.Unsupported`.
    """
    from suites.core.registry import build_method

    rank_batch = check_distributed(batch, world_size, strategy, kind, loss, overrides)

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
    with process_group(world_size, fake) if strategy else contextlib.nullcontext() as mesh:
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
            model_call = wrap_ddp(net, tracker, world_size, fake) if strategy == "ddp" else net
            batch_ = {k: v.to(device) for k, v in make_batch(vocab, rank_batch, seq).items()}
        if tracker is None:
            meter = make_meter(kind, net, optimizer, kernel_policy)
        else:
            meter = (DistributedEstimateMeter(net, optimizer, kernel_policy, fake_mode) if fake
                     else Meter(net, optimizer, kernel_policy))
            meter.tracker = tracker
        loss_fn = lean.causal_lm_loss if loss == "chunked" else lean.model_loss
        after_backward = {}

        def step():  # what the harness does (suites.launch.recipe.optimizer_step), minus timing and logging
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


def estimate_for(cfg: dict) -> dict:
    """The fake-tensor estimate (`measure`) of the configuration a CUDA run measured:
    same model, method and hyper-parameters, micro-batch, sequence, rank, dtype, checkpointing and lean
    blocks, so every GPU record also checks the estimator; a data-parallel run's is the per-rank estimate of
    its strategy and world size (fake process group: the run's own group is closed by then). A method the
    estimator cannot run is said in one line."""
    from suites.core import registry
    from suites.train import models

    method = cfg["method"]
    method_keys = (set(registry.method_defaults(method)) | set(registry.method_options(method))) - {"lr"}
    overrides = {k: cfg[k] for k in method_keys if k in cfg}
    try:
        row = measure(models.weights_spec(cfg) or cfg["model"], cfg["method"], batch=cfg["batch"],
                             seq=cfg["seq_len"], rank=cfg["rank"], dtype=cfg["dtype"],
                             checkpointing=cfg["checkpointing"], lean_blocks=cfg["lean_activations"],
                             overrides=overrides, kind="estimate", world_size=cfg["world_size"],
                             strategy=cfg.get("strategy"))
    except (RuntimeError, ValueError) as exc:
        return {"estimate_error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"}
    return {"estimate_bytes": row["peak_bytes"], "estimate_breakdown": row["breakdown"]}


def check_distributed(batch: int, world_size: int, strategy: str | None, kind: str, loss: str,
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
    from suites.core.presets import carries_weights

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


