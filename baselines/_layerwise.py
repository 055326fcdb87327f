"""Layer-wise updates ("optimizer step in backward", GaLore §4.3): each parameter gets its own optimizer,
stepped from a post-accumulate-grad hook the moment its gradient is complete, and the gradient is freed
right after. Only one parameter's gradient is alive at a time, which is how GaLore reports its 7B memory.

Limits (inherent to the technique): no gradient accumulation over micro-batches and no global gradient
clipping, because every backward pass immediately updates the weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class _StateView(Mapping):
    """Read-only `optimizer.state` view over the per-parameter optimizers (for meters and tests)."""

    def __init__(self, owner: dict):
        self._owner = owner

    def __getitem__(self, param):
        return self._owner[param].state[param]

    def __iter__(self):
        return (p for p, opt in self._owner.items() if p in opt.state)

    def __len__(self):
        return sum(1 for _ in self)


class LayerwiseOptimizer(torch.optim.Optimizer):
    """Wraps one `make_optimizer([group])` per parameter; `step()` is a no-op because the work happened in
    backward. `param_groups` are the inner optimizers' own group dicts, so LR schedulers reach them."""

    # every parameter is updated inside backward: data-parallel wrappers refuse it
    # (`suites.train.distributed`)
    steps_in_backward = True

    def __init__(self, param_groups: list[dict], make_optimizer):
        self._owner: dict[torch.Tensor, torch.optim.Optimizer] = {}
        inner: list[torch.optim.Optimizer] = []
        for group in param_groups:
            for p in group["params"]:
                opt = make_optimizer([{**group, "params": [p]}])
                self._owner[p] = opt
                inner.append(opt)
                p.register_post_accumulate_grad_hook(self._step_one)
        self._inner = inner
        super().__init__([g for opt in inner for g in opt.param_groups], {})
        self.param_groups = [g for opt in inner for g in opt.param_groups]  # the same dicts, not copies

    @property
    def state(self):
        return _StateView(self._owner)

    @state.setter
    def state(self, _value):  # torch.optim.Optimizer.__init__ assigns an empty dict; the state lives inside
        pass

    @torch.no_grad()
    def _step_one(self, param: torch.Tensor) -> None:
        opt = self._owner[param]
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step(self, closure=None):
        return closure() if closure is not None else None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self._inner:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"layerwise": [opt.state_dict() for opt in self._inner]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict["layerwise"]
        if len(parts) != len(self._inner):
            raise ValueError(f"layer-wise state has {len(parts)} optimizers, expected {len(self._inner)}")
        for opt, part in zip(self._inner, parts, strict=True):
            opt.load_state_dict(part)
