"""The timing core of `python -m suites.speed` (its --help says what is counted and how): a method's compute
ops, host syncs and linalg calls per training step (FakeTensorMode, `suites.measure.dispatch`), CPU wall
times of a launch-bound shape, and CUDA times with a graph-capture attempt."""

from __future__ import annotations

import statistics
import time
import warnings

import torch

from suites.core import dtypes
from suites.measure.dispatch import DispatchCounter
from suites.train import lean

KINDS = ("estimate", "cuda")
PHASES = ("forward", "backward", "optimizer")
LAUNCH_BOUND = {"hidden": 64, "intermediate": 172, "layers": 30, "heads": 4, "vocab": 1024, "batch": 1,
                "seq": 32, "rank": 8}


# -- building ------------------------------------------------------------------------------------------------

def trained_config(method: str, rank: int, overrides: dict | None = None, *, refresh: bool = False) -> dict:
    """The method's config as `suites.measure.memory` makes it, but at the trained refresh period (its
    registry default), or with the period key set to 1 when `refresh` (a refresh at every step)."""
    from suites.core.registry import method_defaults
    from suites.measure.memory import REFRESH_KEYS, method_config

    cfg = method_config(method, rank, dict(overrides or {}))
    defaults = method_defaults(method)
    for key in REFRESH_KEYS:
        if key in defaults:
            cfg[key] = 1 if refresh else (overrides or {}).get(key, defaults[key])
    return cfg


def refresh_period(cfg: dict, method: str) -> int | None:
    """The trained refresh period of a periodic method, None for one without a period."""
    from suites.core.registry import method_defaults
    from suites.measure.memory import REFRESH_KEYS

    keys = [k for k in REFRESH_KEYS if k in method_defaults(method)]
    return int(cfg[keys[0]]) if keys else None


def _optimizers(obj, seen=None, depth=0):
    """torch optimizers reachable from `obj` (itself, attributes, lists: a layer-wise wrapper's inner)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 3:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.optim.Optimizer):
        yield obj
    if isinstance(obj, (list, tuple)):
        children = obj
    elif isinstance(obj, dict):
        children = obj.values()
    elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.Tensor, torch.nn.Module)):
        children = vars(obj).values()
    else:
        return
    for child in children:
        ours = type(child).__module__.split(".")[0] in ("baselines", "oasis")
        if isinstance(child, (torch.optim.Optimizer, list, tuple, dict)) or (
                hasattr(child, "__dict__") and ours):
            yield from _optimizers(child, seen, depth + 1)


def cuda_optimizer_defaults(optimizer) -> list[str]:
    """Make torch's optimizers take their CUDA default (foreach) where `foreach` was left to torch; returns
    the classes changed. On CPU tensors (fake ones included) torch would pick the single-tensor loop."""
    changed = []
    for opt in _optimizers(optimizer):
        if "foreach" not in opt.defaults:
            continue
        for group in opt.param_groups:
            if group.get("foreach") is None and not group.get("fused") and not group.get("differentiable"):
                group["foreach"] = True
                changed.append(type(opt).__name__)
    return sorted(set(changed))


def count_step(model: str, method: str, *, batch: int, seq: int, rank: int, dtype: str = "bfloat16",
               attn: str = "sdpa", refresh: bool = False, overrides: dict | None = None) -> dict:
    """Ops, syncs and linalg calls per phase of the second training step under FakeTensorMode."""
    from suites.core.registry import build_method
    from suites.measure.memory import (
        _masks_as_in_real_runs,
        build_model,
        cast_params,
        load_config,
        make_batch,
    )
    from suites.measure.meters import CudaDropout, fake_construction

    torch_dtype = dtypes.torch_dtype(dtype)
    config = load_config(model)
    cfg = trained_config(method, rank, overrides, refresh=refresh)
    with fake_construction(), _masks_as_in_real_runs(), CudaDropout():
        net = build_model(config, torch_dtype, attn, False)
        counter = DispatchCounter(roots=[net])  # device provenance from here on; counting from the 2nd step
        counter.counting = False
        with counter:
            net, optimizer = build_method(method, net, cfg)
            cast_params(net, torch_dtype)
            batch_ = make_batch(config.vocab_size, batch, seq)
        counter.add_roots([net, optimizer, batch_])
        foreach = cuda_optimizer_defaults(optimizer)

        def step():
            with counter:
                with counter.phase("forward"):
                    loss = lean.model_loss(net, batch_)
                with counter.phase("backward"):
                    loss.backward()
                with counter.phase("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

        step()  # warm-up: lazily created state, first bases
        counter.add_roots([net, optimizer])
        counter.counting = True
        step()
    phases = {p: counter.counts[p].as_dict() for p in PHASES}
    total = counter.total(PHASES)
    return {"phases": phases, "ops": total.ops, "syncs": total.sync_count,
            "sync_ops": dict(sorted(total.syncs.items())), "linalg": total.linalg_count,
            "linalg_ops": dict(sorted(total.linalg.items())), "foreach_set": foreach,
            "period": refresh_period(cfg, method)}


def count_method(model: str, method: str, **kwargs) -> dict:
    """One row: the trained-period step, the refresh step (forced on a second build for a periodic method)
    and the amortised ops per step."""
    t0 = time.perf_counter()
    step = count_step(model, method, **kwargs)
    period = step["period"]
    refresh = count_step(model, method, refresh=True, **kwargs) if period and period > 1 else None
    row = {"method": method, "period": period, "step": step, "refresh": refresh}
    if refresh is not None:
        row["ops_per_step"] = round(((period - 1) * step["ops"] + refresh["ops"]) / period, 1)
        row["syncs_per_step"] = round(((period - 1) * step["syncs"] + refresh["syncs"]) / period, 2)
    else:
        row["ops_per_step"], row["syncs_per_step"] = step["ops"], step["syncs"]
    row["count_s"] = round(time.perf_counter() - t0, 1)
    return row


# -- CPU time in a launch-bound shape -------------------------------------------------------------------

def launch_bound_config(hidden: int):
    from suites.train.models import llama_config

    s = LAUNCH_BOUND
    return llama_config("llama-tiny", hidden_size=hidden, intermediate_size=s["intermediate"] * hidden // 64,
                        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                        num_key_value_heads=s["heads"], vocab_size=s["vocab"])


def cpu_times(methods: list[str], *, hidden: int, rounds: int, warmup: int = 3, log=None) -> dict:
    """method -> {step_ms, optimizer_ms, ...}: medians of `rounds` interleaved steps on one thread."""
    from suites.core.registry import build_method
    from suites.measure.memory import build_model, make_batch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = launch_bound_config(hidden)
        built = {}
        for method in methods:
            net, optimizer = build_method(method, build_model(config, torch.float32, "sdpa", False),
                                          trained_config(method, LAUNCH_BOUND["rank"]))
            cuda_optimizer_defaults(optimizer)
            built[method] = (net, optimizer)
        batch = make_batch(config.vocab_size, LAUNCH_BOUND["batch"], LAUNCH_BOUND["seq"])
        times = {m: {"step": [], "optimizer": []} for m in methods}

        def step(method):
            net, optimizer = built[method]
            t0 = time.perf_counter()
            lean.model_loss(net, batch).backward()
            t1 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t2 = time.perf_counter()
            return t2 - t0, t2 - t1

        for i in range(warmup + rounds):
            for method in methods:  # interleaved: one step of each method per round
                total, opt = step(method)
                if i >= warmup:
                    times[method]["step"].append(total)
                    times[method]["optimizer"].append(opt)
            if log and i >= warmup:
                log(f"  cpu round {i - warmup + 1}/{rounds}")
    finally:
        torch.set_num_threads(threads)
    out = {m: {"step_ms": round(1000 * statistics.median(t["step"]), 3),
               "optimizer_ms": round(1000 * statistics.median(t["optimizer"]), 3)} for m, t in times.items()}
    if "adam" in out:
        for m in out:
            out[m]["step_to_adam"] = round(out[m]["step_ms"] / out["adam"]["step_ms"], 3)
            out[m]["optimizer_to_adam"] = round(out[m]["optimizer_ms"] / out["adam"]["optimizer_ms"], 3)
    return out


# -- CUDA ----------------------------------------------------------------------------------------------------

def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise ValueError("--kind cuda needs a CUDA device")


def cuda_times(model: str, method: str, *, batch: int, seq: int, rank: int, dtype: str, attn: str,
               min_steps: int, warmup: int, try_graph: bool = False) -> dict:
    """CUDA-event times of a window of max(period, min_steps) steps at the trained period (amortised), the
    optimizer part of each step, CUDA's own count of syncs in one step, and a graph-capture attempt."""
    from suites.core.registry import build_method
    from suites.measure.memory import build_model, cast_params, load_config, make_batch

    require_cuda()
    device = torch.device("cuda", torch.cuda.current_device())
    torch_dtype = dtypes.torch_dtype(dtype)
    config = load_config(model)
    cfg = trained_config(method, rank)
    period = refresh_period(cfg, method) or 1
    with torch.device(device):
        net, optimizer = build_method(method, build_model(config, torch_dtype, attn, False).to(device), cfg)
    cast_params(net, torch_dtype)
    batch_ = {k: v.to(device) for k, v in make_batch(config.vocab_size, batch, seq).items()}
    opt_events = []

    def step(time_optimizer=False):
        lean.model_loss(net, batch_).backward()
        if time_optimizer:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if time_optimizer:
            end.record()
            opt_events.append((start, end))

    for _ in range(warmup):
        step()
    window = max(period, min_steps)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(window):
        step(time_optimizer=True)
    end.record()
    torch.cuda.synchronize(device)
    row = {"method": method, "period": period, "window_steps": window,
           "step_ms": round(start.elapsed_time(end) / window, 3),
           "optimizer_ms": round(sum(s.elapsed_time(e) for s, e in opt_events) / window, 3),
           "cuda_syncs_in_step": _cuda_reported_syncs(step),
           "graph_capture": _try_graph_capture(optimizer) if try_graph else "not tried",
           "gpu": torch.cuda.get_device_name(device)}
    net = optimizer = batch_ = None  # the next method starts from an empty allocator
    torch.cuda.empty_cache()
    return row


def _cuda_reported_syncs(step) -> int:
    """Synchronisations CUDA's sync debug mode reports (one warning each) over one step."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _try_graph_capture(optimizer) -> str:
    """Capture `optimizer.step()` in a CUDA graph once (gradients of the last step are in place): "ok" or the
    first line of why not. Any exception is the answer here, not a failure of the run."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            optimizer.step()
    except Exception as exc:  # noqa: BLE001 - the outcome of the attempt is what is reported
        text = str(exc).strip().splitlines()
        return f"failed: {type(exc).__name__}: {text[0][:200] if text else ''}"
    finally:
        torch.cuda.current_stream().wait_stream(stream)
    return "ok"
