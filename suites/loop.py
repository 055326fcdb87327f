"""The shared training loop: the same for every method (no method names in here).

A method is a model plus a `torch.optim.Optimizer`; the loop only calls forward, backward,
`optimizer.step()`, the LR scheduler and `optimizer.zero_grad()` (never `model.zero_grad()`, which
would wipe state that some optimizers keep in gradient buffers). Optimizers that track a basis
report its motion through `optimizer.subspace_drift()`, which the loop records when it exists.

Timeline of one run (DESIGN §5):
    step 0                      warm-up, inside the meter (creates lazily allocated optimizer state)
    steps 1 .. mem_window       the memory window: peak bytes are taken over these steps
    steps mem_window+1 .. end   timed for tokens/s and median step time (the CPU meter slows the
                                window down, so timing it would be unfair to nobody but still wrong);
                                when there are none, the window steps are timed instead
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import torch


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
    memory: dict | None = None
    speed: dict | None = None
    steps_done: int = 0


def train(
    model,
    optimizer,
    batches: list[dict],
    *,
    steps: int,
    mem_window: int,
    schedule: str,
    warmup_steps: int,
    min_lr_ratio: float,
    meter,
    device: str,
    progress=None,
) -> TrainResult:
    """Run `steps` optimizer steps over `batches` (cycled) and measure memory and speed.

    Exceptions other than divergence and out-of-memory propagate (the caller records them as `error`).
    """
    res = TrainResult()
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(schedule, warmup_steps, steps, min_lr_ratio)
    )
    drift_fn = getattr(optimizer, "subspace_drift", None)
    if not callable(drift_fn):
        drift_fn = None
    else:
        res.drift = []
    cuda = str(device).startswith("cuda")
    times: dict[int, float] = {}
    tokens: dict[int, int] = {}
    model.train()

    def step(i: int) -> None:
        batch = {k: v.to(device, non_blocking=True) for k, v in batches[i % len(batches)].items()}
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**batch).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            res.curve.append([i, value, None])
            raise Diverged(i, value)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times[i] = time.perf_counter() - t0
        tokens[i] = int(batch["attention_mask"].sum())
        res.curve.append([i, value, None])
        if drift_fn is not None:
            res.drift.append([i, float(drift_fn())])
        res.steps_done = i + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{value:.3f}", tok_s=f"{tokens[i] / times[i]:.0f}", refresh=False)

    try:
        try:
            with meter:
                step(0)
                meter.start_window()
                for i in range(1, mem_window + 1):
                    step(i)
        finally:
            if res.steps_done > mem_window:
                res.memory = meter.result()
        for i in range(mem_window + 1, steps):
            step(i)
    except Diverged as exc:
        res.status, res.error = "diverged", str(exc)
    except Exception as exc:  # noqa: BLE001 - OOM is a result; anything else goes up to the caller
        if not is_oom(exc):
            raise
        res.status, res.error = "oom", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"

    timed = [i for i in times if i > mem_window] or [i for i in times if i > 0]
    if timed:
        res.speed = {
            "tokens_per_s": sum(tokens[i] for i in timed) / sum(times[i] for i in timed),
            "step_time_s": statistics.median(times[i] for i in timed),
        }
    return res
