"""One training run, start to finish. `suites.run` starts it in its own process (`python -m suites.worker
SPEC.json`), where SPEC is {config, out_dir, base_dir?, save_dir?, position}; read top to bottom:

    session = setup(spec)                  # seeds, data, model, method, LR schedule, memory meter
    result = train(session)                # warm-up step, memory window, timed steps
    metrics = evaluate(session)            # the suite's one shared evaluation
    record(spec, result, metrics, ...)     # one JSON record, written atomically

`run(spec)` chains them; any failure is a result too: divergence, out-of-memory and any other exception
each end as a record with that status (ok | diverged | oom | error). Nothing here knows a method's name:
a method is a model plus a `torch.optim.Optimizer` from the registry. The loop only calls forward,
backward, `optimizer.step()`, the LR scheduler and `optimizer.zero_grad()` (never `model.zero_grad()`,
which would wipe state that LDAdam keeps in gradient buffers); an optimizer that tracks a basis reports
its motion through `optimizer.subspace_drift()`, recorded when it exists.

Timeline of `train` (DESIGN §5):
    step 0                      warm-up, inside the meter (creates lazily allocated optimizer state)
    steps 1 .. mem_window       the memory window: peak bytes are taken over these steps
    steps mem_window+1 .. end   timed for tokens/s and median step time (the CPU meter slows the window
                                down, so it is not timed); when there are none, the window steps are timed

Where later features plug in, each in one function: the model (`build_model`: gradient checkpointing,
a distributed wrapper), the data (`build_batches`: a rank's shard; `step_batches`: the micro-batches of
one optimizer step, i.e. gradient accumulation) and the update (`optimizer_step`: forward and backward
over those micro-batches, then one optimizer step).
"""

from __future__ import annotations

import gc
import math
import os
import random
import statistics
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from suites.core import files, records
from suites.core.profiles import PERIODIC_KEYS, option
from suites.core.registry import build_method
from suites.evaluate.tasks import get as get_suite
from suites.measure import tracking
from suites.measure.meters import Meter, make_meter
from suites.train import distributed, models

# ------------------------------------------------------------------------------------------- setup


def threads() -> int:
    """Intra-op threads of a run: $OASIS_THREADS, else half the cores (at least 1).

    On a small shared machine, one busy thread per run beats two threads fighting other processes
    (a llama-tiny step measured 15x slower with 2 threads under load); the count goes into the record.
    The N ranks of a data-parallel run on one machine share the default: half the cores divided by N.
    """
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, int(os.environ.get("OASIS_THREADS") or (os.cpu_count() or 2) // 2 // ranks_here))


@dataclass
class Session:
    """Everything one run holds while it trains and is evaluated."""

    cfg: dict
    suite: ModuleType  # suites.evaluate.tasks.<suite>: train_batches, evaluate, HEADLINE
    tokenizer: Any
    batches: list[dict]  # this process's micro-batches, in training order (cycled)
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    meter: Meter
    step0: dict = field(default_factory=dict)  # the suite's metrics of the model before the first step
    base_checksum: str | None = None  # records.weights_checksum of the weights the run starts from
    position: int = 1  # row of the progress bar (the sweep's bar is row 0)
    data_parallel: distributed.DataParallel | None = None  # the DDP wrapper when world_size > 1
    tracking: tracking.Tracking | None = None  # the tracking diagnostic (track_points > 0, one process)

    @property
    def train_model(self) -> torch.nn.Module:
        """What the training step calls: the DDP wrapper in a data-parallel run, else the model."""
        return self.data_parallel.model if self.data_parallel is not None else self.model

    @property
    def device(self) -> str:
        return self.cfg["device"]


def setup(spec: dict) -> Session:
    """Seed, then build the data, the model and the method, in that order (the order fixes the RNG draws)."""
    cfg = spec["config"]
    if cfg["world_size"] > 1:
        distributed.init(cfg)  # before anything touches the device: a CUDA rank takes its own GPU
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    torch.set_num_threads(threads())
    suite = get_suite(cfg["suite"])
    tokenizer = models.load_tokenizer(cfg)
    batches = build_batches(suite, tokenizer, cfg)
    model = build_model(cfg, spec.get("base_dir"))
    base_checksum = records.weights_checksum(model)  # before the method wraps or changes the model
    # rank 0 evaluates, before training as after it
    step0 = suite.before_training(model, tokenizer, cfg, cfg["device"]) if distributed.is_main() else {}
    model, optimizer, data_parallel = build_parallel_method(cfg, model, spec.get("base_dir"))
    meter = make_meter("cuda" if cfg["device"].startswith("cuda") else "cpu", model, optimizer,
                       shards=data_parallel.shards if data_parallel is not None else None)
    schedule = lr_factor(cfg["schedule"], cfg["warmup_steps"], cfg["steps"], cfg["min_lr_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return Session(cfg, suite, tokenizer, batches, model, optimizer, scheduler, meter, step0=step0,
                   base_checksum=base_checksum, position=spec.get("position", 1),
                   data_parallel=data_parallel,
                   tracking=build_tracking(cfg, suite, tokenizer, model, optimizer))


def build_tracking(cfg: dict, suite: ModuleType, tokenizer, model, optimizer) -> tracking.Tracking | None:
    """The tracking diagnostic (`suites.measure.tracking`) when `track_points` > 0, in a one-process run (a
    sharded
    model cannot run the diagnostic's forward on one rank alone); it measures whatever bases the optimizer
    exposes, nothing when it exposes none."""
    if not option(cfg, "track_points") or cfg["world_size"] > 1:
        return None
    points = tracking.points(cfg["steps"], cfg["mem_window"], option(cfg, "track_points"))
    return tracking.Tracking(model, optimizer, suite.tracking_batch(tokenizer, cfg), points, cfg["device"])


def build_parallel_method(cfg: dict, model: torch.nn.Module, base_dir: str | None):
    """(model, optimizer, data_parallel): the method on the model, alone (data_parallel None) or as one of
    N ranks: wrapped in DDP (`strategy` ddp), or built on FSDP2 shards (fsdp; `distributed.build_sharded`
    may build the model a second time for a method that changes it, as it sees fit)."""
    if cfg["world_size"] == 1:
        return (*build_method(cfg["method"], model, cfg), None)
    if cfg.get("strategy") == "fsdp":
        first = [model]

        def make_model():
            return first.pop() if first else build_model(cfg, base_dir)

        model, optimizer, shards = distributed.build_sharded(cfg["method"], make_model, cfg,
                                                             distributed.device_mesh(cfg["device"]))
        return model, optimizer, distributed.ShardedDataParallel(model, optimizer, shards)
    model, optimizer = build_method(cfg["method"], model, cfg)
    return model, optimizer, distributed.DataParallel(model, optimizer, cfg["device"])


def evaluation_model(cfg: dict, base_dir: str | None, state: dict) -> torch.nn.Module:
    """An unsharded copy of an FSDP2-trained model for rank 0's evaluation: the method built on a fresh
    model (same structure, same parameter names), with the trained full state dict loaded."""
    model, _ = build_method(cfg["method"], build_model(cfg, base_dir), cfg)
    model.load_state_dict(state)
    return model


def build_batches(suite: ModuleType, tokenizer, cfg: dict) -> list[dict]:
    """The micro-batches this process trains on, in order: the suite's deterministic batches for the seed,
    the same for every method; `grad_accum` of them make one optimizer step. One of N ranks takes its rows
    of each (`distributed.shard`), so the N ranks together train on the single process's batches."""
    batches = suite.train_batches(tokenizer, {**cfg, "steps": cfg["steps"] * cfg["grad_accum"]})
    if cfg["world_size"] > 1:
        batches = [distributed.shard(b, distributed.rank(), distributed.world()) for b in batches]
    return batches


def build_model(cfg: dict, base_dir: str | None) -> torch.nn.Module:
    """The model a method is built on: random init (`base: random`), the project's pretrained c4 base
    (`base: c4`, from `base_dir`) or a model's own weights (`suites.train.models`); in cfg's dtype, on cfg's
    device."""
    model = models.load_model(cfg, base_dir)
    if cfg["checkpointing"]:
        models.enable_checkpointing(model)
    if cfg.get("lean_activations"):
        from suites.train.lean import apply_lean_activations

        if not apply_lean_activations(model):
            raise ValueError("lean_activations=true but the model has no RMSNorm/SwiGLU modules to patch")
    return model


# ------------------------------------------------------------------------------------------- train


class Diverged(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}")
        self.step, self.loss = step, loss


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError)
    )


def lr_factor(schedule: str, warmup: int, steps: int, min_ratio: float):
    """LambdaLR factor: linear warm-up over `warmup` steps, then cosine decay to `min_ratio`."""

    def factor(step: int) -> float:
        if schedule == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class TrainResult:
    status: str = "ok"  # ok | diverged | oom | error
    error: str | None = None
    curve: list = field(default_factory=list)  # [step, train_loss, eval_loss|None]
    drift: list | None = None  # [step, radians] when the optimizer tracks a basis
    tracking: dict | None = None  # {refreshes, tracking: [...]}: suites.measure.tracking
    memory: dict | None = None
    speed: dict | None = None
    comm: dict | None = None  # bytes all-reduced per optimizer step (data-parallel runs)
    steps_done: int = 0
    timings: dict = field(default_factory=dict, repr=False)  # step -> (seconds, tokens); not recorded


def train(session: Session) -> TrainResult:
    """Run cfg["steps"] optimizer steps, measuring memory over the window and speed after it.

    Divergence and out-of-memory end the run as results; any other exception propagates.
    """
    cfg, meter = session.cfg, session.meter
    result = TrainResult(drift=[] if callable(getattr(session.optimizer, "subspace_drift", None)) else None)
    window = cfg["mem_window"]
    progress = _progress(cfg, session.position)
    session.model.train()
    try:
        try:
            with meter:
                _timed_step(session, 0, result, progress)
                meter.start_window()
                for step in range(1, window + 1):
                    _timed_step(session, step, result, progress)
        finally:
            if result.steps_done > window:
                result.memory = meter.result()
        for step in range(window + 1, cfg["steps"]):
            _timed_step(session, step, result, progress)
            _periodic_eval(session, step, result)
    except Diverged as exc:
        result.curve.append([exc.step, exc.loss, None])
        result.status, result.error = "diverged", str(exc)
    except Exception as exc:  # noqa: BLE001 - OOM is a result; anything else goes up to the caller
        if not is_oom(exc):
            raise
        result.status, result.error = "oom", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    finally:
        if progress is not None:
            progress.close()
    result.speed = _speed(result.timings, window)
    if session.tracking is not None:
        result.tracking = session.tracking.result() or None
    if session.data_parallel is not None:
        _merge_ranks(session, result)
    return result


def _merge_ranks(session: Session, result: TrainResult) -> None:
    """A data-parallel run's memory is its largest rank's (every rank's peak kept beside it); `comm` is
    what the counter saw (the same on every rank: DDP and the statistics send the same tensors)."""
    memories = distributed.gather(result.memory)
    if all(m is not None for m in memories):
        peaks = [m["peak_bytes"] for m in memories]
        largest = max(range(len(peaks)), key=peaks.__getitem__)
        result.memory = {**memories[largest], "per_rank_peak_bytes": peaks, "peak_rank": largest}
    dp = session.data_parallel
    result.comm = dp.counter.result(dp.backend)


def step_batches(session: Session, step: int) -> list[dict]:
    """The `grad_accum` micro-batches of optimizer step `step`, on the run's device."""
    k = session.cfg["grad_accum"]
    picked = [session.batches[(step * k + j) % len(session.batches)] for j in range(k)]
    return [{key: v.to(session.device, non_blocking=True) for key, v in batch.items()} for batch in picked]


def optimizer_step(session: Session, step: int, micro_batches: list[dict]) -> float:
    """Forward and backward over the step's micro-batches, then one optimizer and LR-schedule step;
    returns the training loss (the step's token-weighted mean). Raises Diverged, before any update, when
    a micro-batch's loss is not finite.

    Each micro-batch's mean loss is weighted by its share of the step's supervised tokens, so the summed
    gradient equals the gradient of one batch holding all micro-batches, padding or not (a plain 1/k
    would weight a short micro-batch's tokens more). OASIS keeps its basis fixed over the micro-batches
    and moves it in `optimizer.step()` from the statistics of all of them.

    One of N data-parallel ranks weights its part by its share of the global step's tokens times N (DDP
    averages over ranks), checks and returns the global loss (summed over ranks: every rank raises
    Diverged together), and all-reduces gradients after the last micro-batch only."""
    model, optimizer, ranks = session.train_model, session.optimizer, distributed.world()
    counts = [supervised_tokens(batch) for batch in micro_batches]
    totals = distributed.sum_over_ranks(counts) if ranks > 1 else counts  # per micro-batch, all ranks
    total = sum(totals)
    value = 0.0
    for j, (batch, count) in enumerate(zip(micro_batches, counts)):
        sync = session.data_parallel.no_sync(last=j == len(counts) - 1) if ranks > 1 else nullcontext()
        with sync:
            loss = model(**batch).loss
            part = float(loss.detach())
            if ranks > 1:
                part = distributed.sum_over_ranks([part * count])[0] / totals[j]
            if not math.isfinite(part):
                raise Diverged(step, part)
            (loss * (count * ranks / total)).backward()
        value += part * totals[j] / total
    optimizer.step()
    session.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if session.data_parallel is not None:
        session.data_parallel.counter.end_step()
    return value


def supervised_tokens(batch: dict) -> int:
    """Tokens a causal-LM loss averages over: labels after the one-position shift that are not -100."""
    labels = batch.get("labels", batch["input_ids"])
    mask = labels[:, 1:] != -100
    if "labels" not in batch:
        mask = mask & batch["attention_mask"][:, 1:].bool()
    return int(mask.sum())


def _timed_step(session: Session, step: int, result: TrainResult, progress) -> None:
    micro_batches = step_batches(session, step)
    _synchronize(session.device)
    t0 = time.perf_counter()
    loss = optimizer_step(session, step, micro_batches)
    _synchronize(session.device)
    seconds = time.perf_counter() - t0
    tokens = sum(int(batch["attention_mask"].sum()) for batch in micro_batches)
    if distributed.world() > 1:  # tokens/s of the run: every rank's tokens per second of the step
        tokens = int(distributed.sum_over_ranks([tokens])[0])
    result.timings[step] = (seconds, tokens)
    result.curve.append([step, loss, None])
    if result.drift is not None:
        result.drift.append([step, float(session.optimizer.subspace_drift())])
    if session.tracking is not None:  # after the step's timing: the diagnostic is not part of the method
        session.tracking.maybe_measure(step)
    result.steps_done = step + 1
    if progress is not None:
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens / seconds:.0f}", refresh=False)


def _periodic_eval(session: Session, step: int, result: TrainResult) -> None:
    """With `eval_every` N > 0, the suite's held-out loss after every N-th optimizer step goes into the loss
    curve's third column (outside the memory window and the step timings; the last step's value is the
    final evaluation's)."""
    every = option(session.cfg, "eval_every")
    if every and (step + 1) % every == 0 and step < session.cfg["steps"] - 1 and distributed.is_main():
        result.curve[-1][2] = session.suite.heldout_loss(session.model, session.tokenizer, session.cfg,
                                                         session.device)


def _synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _speed(timings: dict, window: int) -> dict | None:
    timed = [s for s in timings if s > window] or [s for s in timings if s > 0]
    if not timed:
        return None
    return {
        "tokens_per_s": sum(timings[s][1] for s in timed) / sum(timings[s][0] for s in timed),
        "step_time_s": statistics.median(timings[s][0] for s in timed),
    }


def _progress(cfg: dict, position: int):
    if os.environ.get("OASIS_NO_PROGRESS") or not distributed.is_main():
        return None
    from tqdm import tqdm

    return tqdm(total=cfg["steps"], desc=f"  {cfg['method']}", position=position, leave=False, unit="step",
                dynamic_ncols=True)


# ------------------------------------------------------------------------------------------- evaluate


def evaluate(session: Session) -> dict:
    """The suite's shared evaluation of the trained model (the same function for every method), with the
    same suite's metrics before the first step under `step0`, so a record shows what training changed."""
    from suites.train import sources

    metrics = session.suite.evaluate(session.model, session.tokenizer, session.cfg, session.device)
    reference = getattr(session.suite, "reference", None)  # suites.train.unigram
    if reference is not None:
        metrics.update(reference(session.tokenizer, session.cfg))
    # the source, row count and row digest of every split the run read (training and evaluation)
    return {**metrics, "step0": session.step0, "data": sources.used()}


def save_model(session: Session, save_dir: str) -> None:
    """Save a pretrained base atomically (written next to `save_dir`, then renamed into place)."""
    files.atomic_dir(save_dir, session.model.save_pretrained)


# ------------------------------------------------------------------------------------------- record


def record(spec: dict, result: TrainResult, metrics: dict, *, started_at: str, wall_s: float,
           base_checksum: str | None = None, commit: str | None = None) -> dict:
    """Write the run's record to spec["out_dir"] (rank 0 of a data-parallel run) and return it."""
    rec = records.make_record(
        spec["config"], status=result.status, error=result.error, metrics=metrics, memory=result.memory,
        speed=result.speed, curve=result.curve, drift=result.drift, started_at=started_at, wall_s=wall_s,
        base_checksum=base_checksum, comm=result.comm, tracking=result.tracking, commit=commit,
    )
    if distributed.is_main():
        records.write_record(rec, spec["out_dir"])
    return rec


def memory_pass_config(cfg: dict) -> dict | None:
    """The config of a separate memory pass when the run's own refresh period puts no basis refresh inside
    the memory window (DESIGN §5): the same run with every period set to 1, only warm-up and window long.
    None when the run's own window already contains a refresh (or the method has no period)."""
    forced = {k: 1 for k in PERIODIC_KEYS if k in cfg and not 1 <= cfg[k] <= cfg["mem_window"]}
    if not forced:
        return None
    return {**cfg, **forced, "steps": cfg["mem_window"] + 1}


def measure_memory_pass(spec: dict, pass_cfg: dict) -> TrainResult:
    """Warm-up and window of `pass_cfg` under the meter, on a model and method built for the pass alone and
    dropped after it: the run that follows re-seeds and rebuilds everything, so its trajectory is the one it
    would have had without the pass."""
    session = setup({**spec, "config": pass_cfg})
    try:
        return train(session)
    finally:
        del session
        gc.collect()


def run(spec: dict) -> dict:
    """[memory pass ->] setup -> train -> evaluate (when training ended ok) -> record; returns the record."""
    started_at, t0 = records.now(), time.perf_counter()
    commit = records.git_commit()  # the code this process imported, not the checkout when it ends
    result, metrics, session = TrainResult(), {}, None
    try:
        pass_cfg = memory_pass_config(spec["config"])
        forced = measure_memory_pass(spec, pass_cfg) if pass_cfg else None
        if forced is not None and forced.status != "ok":
            raise RuntimeError(f"the memory pass ended {forced.status}: {forced.error}")
        session = setup(spec)
        result = train(session)
        if forced is not None and result.memory is not None:
            # the window's peak with a refresh in it; what the trajectory's own window kept is kept beside it
            result.memory = {**forced.memory, "refresh_forced": {k: pass_cfg[k] for k in PERIODIC_KEYS
                                                                if k in pass_cfg},
                             "trajectory_peak_bytes": result.memory["peak_bytes"]}
        if session.data_parallel is not None:
            full = session.data_parallel.full_state_dict() if session.data_parallel.shards else None
            distributed.close()  # the ranks are done with each other (train() merged their results)
            if not distributed.is_main():
                return {"status": result.status, "error": result.error}  # rank 0 evaluates and records
            if full is not None:  # a sharded model cannot run forward on one rank alone
                session.model = evaluation_model(session.cfg, spec.get("base_dir"), full)
        if result.memory is not None and result.memory.get("source") == "cuda":
            from suites.measure.memory import estimate_for

            result.memory.update(estimate_for(session.cfg))
        if result.status == "ok":
            metrics = evaluate(session)
            if "eval_loss" in metrics and result.curve:
                result.curve[-1][2] = metrics["eval_loss"]  # the final validation point of the loss curve
            if spec.get("save_dir"):
                save_model(session, spec["save_dir"])
    except Exception as exc:  # noqa: BLE001 - a failed run is a result, recorded with its message
        result.status = "oom" if is_oom(exc) else "error"
        first_line = str(exc).strip().splitlines()[0][:500] if str(exc).strip() else ""
        result.error = f"{type(exc).__name__}: {first_line}"
        if os.environ.get("OASIS_DEBUG"):
            traceback.print_exc()
        if not distributed.is_main():  # its record is rank 0's; say why this rank stopped
            print(f"rank {os.environ.get('RANK')}: {result.error}", file=sys.stderr)
    try:
        return record(spec, result, metrics, started_at=started_at,
                      wall_s=round(time.perf_counter() - t0, 3),
                      base_checksum=session.base_checksum if session is not None else None, commit=commit)
    finally:
        distributed.close()
