"""The method registry: one name -> one builder, so the training loop never branches on the method.

Each method lives in `baselines/<module>.py`, which exposes `DEFAULTS: dict` (its own hyper-parameters) and
`build(model, cfg) -> (model, optimizer)`. Some names are variants of one module with settings pinned
(`galore8bit` is GaLore with 8-bit states, `oasis-frozen` is OASIS with subspace_lr=0, `apollo-mini` is APOLLO
with a rank-1 space and tensor-wise scaling); the pinned settings
cannot be overridden from the command line, use the base method for that.

A module may also expose `OPTIONS: dict`: settings with a default that a config holds only when they are set
(`method_options`), so that adding one does not change the config (and hash) of any earlier run.

Names and defaults are read without importing torch: `DEFAULTS` must be a literal (a dict of numbers,
strings, booleans and tuples), which the registry reads from the module's source, so that a command line
is checked in well under a second and the module stays the one place that defines its defaults.

    from suites.core.registry import build_method, method_defaults
    cfg = {"lr": 1e-3, "weight_decay": 0.0, "betas": (0.9, 0.999), "eps": 1e-8, "rank": 8, "seed": 0}
    model, optimizer = build_method("galore", model, {**method_defaults("galore"), **cfg})
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

MISSION_METHODS = ("adam", "lora", "galore", "ldadam", "pca", "oasis")  # what `--methods all` means
EXTRA_METHODS = ("adam8bit", "galore8bit", "compact", "oasis-notransport", "oasis-frozen", "apollo",
                 "apollo-mini", "adam-mini", "qlora")
ALL_METHODS = MISSION_METHODS + EXTRA_METHODS

# name -> (module under baselines/, settings pinned by the name)
_METHODS: dict[str, tuple[str, dict]] = {
    "adam": ("adam", {}),
    "adam8bit": ("adam8bit", {}),
    "lora": ("lora", {}),
    "galore": ("galore", {}),
    "galore8bit": ("galore", {"optim_bits": 8}),
    "ldadam": ("ldadam", {}),
    "pca": ("pca", {}),
    "compact": ("compact", {}),
    "oasis": ("oasis", {}),
    "oasis-notransport": ("oasis", {"transport": "none"}),
    "oasis-frozen": ("oasis", {"subspace_lr": 0.0}),
    "apollo": ("apollo", {}),
    "apollo-mini": ("apollo_mini", {"aux_rank": 1, "scale_type": "tensor"}),
    "adam-mini": ("adam_mini", {}),
    "qlora": ("qlora", {}),
}

REQUIRED_KEYS = ("lr", "weight_decay", "betas", "eps", "rank", "seed")


def _check_name(name: str) -> None:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)} (or 'all')")


def resolve_methods(spec: str) -> list[str]:
    """'all' -> the six mission methods; 'a,b' -> ['a', 'b'] (order kept, duplicates dropped)."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise ValueError(f"no method given; choose from {', '.join(ALL_METHODS)} (or 'all')")
    out: list[str] = []
    for name in names:
        expanded = list(MISSION_METHODS) if name == "all" else [name]
        for n in expanded:
            _check_name(n)
            if n not in out:
                out.append(n)
    return out


def read_defaults(path: str | Path, name: str = "DEFAULTS", required: bool = True) -> dict:
    """The literal `DEFAULTS = {...}` (or another top-level dict `name`) of a Python source file, read
    without running it; {} for a missing one that is not `required`."""
    path = Path(path)
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == name for t in targets) and node.value is not None:
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                raise TypeError(f"{path}: {name} must be a literal dict (numbers, strings, booleans, "
                                "tuples), so the registry can read it without importing the module") from None
            if not isinstance(value, dict):
                raise TypeError(f"{path}: {name} must be a dict, got {type(value).__name__}")
            return value
    if not required:
        return {}
    raise TypeError(f"{path}: no top-level `{name} = {{...}}`; every method module defines its defaults")


@functools.cache
def _module_defaults(module: str, name: str = "DEFAULTS") -> dict:
    spec = importlib.util.find_spec(f"baselines.{module}")
    if spec is None or spec.origin is None:
        raise ImportError(f"method module baselines.{module} is not installed")
    return read_defaults(spec.origin, name, required=name == "DEFAULTS")


def method_defaults(name: str) -> dict:
    """The method's own hyper-parameters with their defaults (pinned variant settings included)."""
    _check_name(name)
    module, pinned = _METHODS[name]
    return {**copy.deepcopy(_module_defaults(module)), **pinned}


def method_options(name: str) -> dict:
    """The method's `OPTIONS` with their defaults: keys a config carries only when they are set."""
    _check_name(name)
    return copy.deepcopy(_module_defaults(_METHODS[name][0], "OPTIONS"))


def option_witnesses() -> dict:
    """Every method option a --set may name, with its default (which gives its type)."""
    out: dict = {}
    for name in ALL_METHODS:
        for key, value in method_options(name).items():
            out.setdefault(key, value)
    return out


def published_constants(keys) -> dict[str, dict]:
    """method -> {key: value} for the shared optimizer `keys` (betas, eps, ...) that a method's defaults
    set to its paper's value instead of the profile's shared one."""
    out = {}
    for name in ALL_METHODS:
        own = {k: v for k, v in method_defaults(name).items() if k in keys}
        if own:
            out[name] = own
    return out


def build_method(name: str, model: nn.Module, cfg: dict) -> tuple[nn.Module, Optimizer]:
    """Build `name` on `model`. `cfg` holds the common keys plus any method keys (unused keys are ignored);
    method keys missing from `cfg` take the method's defaults. Bad values raise one-line ValueErrors."""
    _check_name(name)
    module_name, pinned = _METHODS[name]
    module = importlib.import_module(f"baselines.{module_name}")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"method config is missing {', '.join(missing)}")
    free = next((n for n, (mod, pins) in _METHODS.items() if mod == _METHODS[name][0] and not pins), None)
    for key, value in pinned.items():
        if key in cfg and cfg[key] != value:
            hint = f"; use method {free!r} to choose {key}" if free else ""
            raise ValueError(f"method {name!r} pins {key}={value!r} (got {cfg[key]!r}){hint}")
    return module.build(model, {**module.DEFAULTS, **getattr(module, "OPTIONS", {}), **cfg, **pinned})
