"""Profiles: the budgets every method shares, as data.

A profile fixes model, base weights (base_seed), data order (seed), steps, batch, accumulation, sequence
length, schedule, rank, dtype and evaluation for every method of a suite. What differs between methods:
the learning rate (per method, in `lrs`), each method's own published hyper-parameters (its DEFAULTS:
GaLore's update_proj_gap 200 and scale 0.25, PCA's refresh 200, CompAct's 50, LoRA's alpha = 2r and
dropout 0.05, OASIS's subspace_lr, ...), and the published optimizer constants a method keeps over the
profile's shared `betas` / `eps` (LDAdam's betas and rho, GaLore's eps: `PER_METHOD_KEYS` in its
defaults). Method hyper-parameters start from the method's own defaults (`registry.method_defaults`)
and can be overridden by profile keys of the same name, then by `--set key=value`.

Resolution order for one run:  method defaults  <  profile  <  --set / --sweep.
"""

from __future__ import annotations

import copy

import yaml

from suites.core import dtypes

# Hyper-parameters that make a method recompute its projection every N optimizer steps. Quality runs keep
# each method's published period (GaLore 200, PCA 200, CompAct 50); when it puts no refresh inside the
# memory window, the recipe measures memory in a separate pass with the period set to 1
# (`recipe.memory_pass_config`): the window contains a refresh and the trained trajectory is unchanged.
PERIODIC_KEYS = ("refresh_every", "update_proj_gap")

# Keys every training profile has (values here are only the types' witnesses; profiles set them all).
_TRAIN = dict(
    model="llama-tiny",  # preset in suites.core.presets.PRESETS
    base="random",  # "random" (random init) | "c4" (pretrained by this project's c4 suite) | hub id
    base_steps=0,  # optimizer steps of the c4 pretraining that makes a "c4" base
    base_lr=3e-3,  # learning rate of that pretraining (AdamW)
    dtype="float32",
    seed=0,  # data order and model init
    base_seed=0,  # the initial weights (random init or the cached pretrained base), fixed per profile
    grad_accum=1,  # micro-batches of `batch` sequences per optimizer step
    checkpointing=False,  # Hugging Face non-reentrant activation checkpointing, for every method alike
    world_size=1,  # processes of one run (torch.distributed); the global batch is the same for every N
    steps=4,  # optimizer steps (step 0 is the memory warm-up step)
    mem_window=3,  # steps measured after the warm-up step; speed is timed on the steps after it
    batch=2,
    seq_len=64,
    schedule="cosine",  # linear warm-up, then cosine to min_lr_ratio * lr | "constant"
    warmup_steps=1,
    min_lr_ratio=0.1,
    weight_decay=0.0,
    betas=(0.9, 0.999),
    eps=1e-8,
    rank=8,
    lean_activations=False,  # suites.train.lean: lean RMSNorm/SwiGLU autograd, for every method alike
    eval_limit=4,  # problems / documents evaluated (None = all)
    eval_batch=8,
    max_gen_toks=32,  # greedy generation budget for accuracy / pass@1
    eval_tokens=4096,  # held-out tokens for the c4 suite's validation loss
    exec_timeout=5.0,  # seconds per HumanEval program
)
# Keys added after records were committed: a resolved config carries one only when it differs from its
# default here, so every config that leaves them alone keeps the hash (and the resumable record) it had.
_OPTIONAL = dict(
    eval_every=0,  # evaluate the suite's headline metric every N optimizer steps into the loss curve (0: off)
    val_tokens=0,  # tokens of a validation slice of the training corpus (c4: `val_loss`; 0: off)
    track_points=0,  # steps of the tracking diagnostic (suites.measure.tracking) over the run; 0: off
    track_tokens=1024,  # held-out tokens the tracking diagnostic measures each basis on
)
_TRAIN.update(_OPTIONAL)


def option(cfg: dict, key: str):
    """A resolved config's value of an optional key (`_OPTIONAL`): absent means its default."""
    return cfg.get(key, _OPTIONAL[key])

# Extras' learning rates. adam-mini and qlora take adam's and lora's. APOLLO's update is the raw gradient
# scaled towards Adam's per-channel step size from an r-dimensional projection, which at r << d is smaller
# than Adam's step by about sqrt(r/d) (its published scale 1 assumes r = d/4); like GaLore's scale-0.25
# update it takes GaLore's (larger) learning rate here. The APOLLO scripts pretrain APOLLO and APOLLO-Mini
# with one learning rate, 1e-2, GaLore's pretraining rate too.
_LRS_FT = {
    "adam": 1e-4,
    "lora": 1e-3,
    "galore": 1e-3,
    "ldadam": 1e-4,
    "pca": 1e-4,
    "oasis": 1e-4,
    "apollo": 1e-3,
    "apollo-mini": 1e-3,
    "adam-mini": 1e-4,
    "qlora": 1e-3,
    "default": 1e-4,
}
# the cpu profiles fine-tune a small base pretrained for only a few hundred steps: larger steps help
_LRS_FT_CPU = {
    "adam": 1e-3,
    "lora": 3e-3,
    "galore": 3e-3,
    "ldadam": 1e-3,
    "pca": 1e-3,
    "oasis": 1e-3,
    "apollo": 3e-3,
    "apollo-mini": 3e-3,
    "adam-mini": 1e-3,
    "qlora": 3e-3,
    "default": 1e-3,
}
# the paper profiles fine-tune Llama-2-7B (gsm8k) and Llama-3.2-1B (humaneval) at the same rates
_LRS_PAPER_FT = {
    "adam": 1e-5,
    "lora": 2e-4,
    "galore": 1e-5,
    "ldadam": 1e-5,
    "pca": 1e-5,
    "oasis": 1e-5,
    "apollo": 1e-5,
    "apollo-mini": 1e-5,
    "adam-mini": 1e-5,
    "qlora": 2e-4,
    "default": 1e-5,
}
_LRS_PT = {
    "adam": 1e-3,
    "lora": 1e-3,
    "galore": 1e-2,
    "ldadam": 1e-3,
    "pca": 1e-3,
    "oasis": 1e-3,
    "apollo": 1e-2,
    "apollo-mini": 1e-2,
    "adam-mini": 1e-3,
    "qlora": 1e-3,
    "default": 1e-3,
}
# Pretraining from random init: LoRA (and QLoRA) train embeddings, norms and lm_head fully besides the
# adapters, as the low-rank baselines of pretraining papers do (baselines/lora.py, `train_unadapted`);
# the fine-tuning profiles keep peft's frozen base (the method's default).
_PRETRAIN_METHOD_KEYS = {"train_unadapted": True}

# `suites.run --lr-grid`: every method's learning rate times these factors, one run each, so each method is
# tuned on the same relative grid around its own published rate (the paper profiles)
PAPER_LR_GRID = (0.5, 1.0, 2.0)

# optimizer steps of the c4 `study` profile (4 x 128 tokens each): the horizon the adam pilot measured
# (suites/study.py says how)
STUDY_STEPS = 800

PROFILES: dict[str, dict[str, dict]] = {
    "c4": {
        "smoke": dict(
            _TRAIN,
            model="llama-tiny",
            steps=4,
            mem_window=3,
            batch=2,
            seq_len=64,
            eval_tokens=2048,
            lrs={**_LRS_PT, "galore": 1e-3, "apollo": 1e-3, "apollo-mini": 1e-3},
            **_PRETRAIN_METHOD_KEYS,
        ),
        "cpu": dict(
            _TRAIN,
            model="llama-cpu",
            steps=60,
            mem_window=11,
            batch=4,
            seq_len=128,
            warmup_steps=6,
            rank=32,
            eval_tokens=16384,
            eval_batch=8,
            lrs=dict(_LRS_PT),
            **_PRETRAIN_METHOD_KEYS,
        ),
        # the committed study v2 (suites.study): the cpu profile's model, batch and sequence, trained long
        # enough that adam ends >= 0.5 nats below the unigram reference of its own training tokens, with
        # PCA's and GaLore's period at 50 (their published 200 would refresh fewer than 10 times inside the
        # horizon; the study ablates 20 / 50 / 200), a validation slice for choosing learning rates
        # (`val_loss`), the loss curve every STUDY_STEPS / 8 steps and the tracking diagnostic at 6 steps
        "study": dict(
            _TRAIN,
            model="llama-cpu",
            steps=STUDY_STEPS,
            mem_window=11,
            batch=4,
            seq_len=128,
            warmup_steps=STUDY_STEPS // 20,
            rank=32,
            eval_tokens=16384,
            eval_batch=8,
            val_tokens=16384,
            eval_every=STUDY_STEPS // 8,
            track_points=6,
            track_tokens=1024,
            refresh_every=50,
            update_proj_gap=50,
            lr_grid=PAPER_LR_GRID,
            lrs=dict(_LRS_PT),
            **_PRETRAIN_METHOD_KEYS,
        ),
        "paper": dict(
            _TRAIN,
            model="llama-130m",
            steps=20000,
            mem_window=201,
            batch=64,  # micro-batch; x grad_accum 8 = GaLore's global batch of 512 sequences
            grad_accum=8,
            seq_len=256,
            warmup_steps=2000,
            rank=256,
            lr_grid=PAPER_LR_GRID,
            eval_tokens=10_000_000,
            eval_batch=64,
            lrs=dict(_LRS_PT),
            **_PRETRAIN_METHOD_KEYS,
        ),
    },
    "gsm8k": {
        "smoke": dict(
            _TRAIN,
            model="llama-tiny",
            steps=4,
            mem_window=3,
            batch=2,
            seq_len=256,
            eval_limit=2,
            max_gen_toks=256,  # lm-eval's default: a reference solution fits (`gen_ceiling` says how many)
            eval_batch=2,
            lrs=dict(_LRS_FT),
            # a model with its own weights (--set model=smollm2-135m): two steps on short sequences
            pretrained=dict(steps=2, mem_window=1, seq_len=160),
        ),
        "cpu": dict(
            _TRAIN,
            model="llama-cpu",
            base="c4",
            base_steps=300,
            steps=32,
            mem_window=6,
            batch=2,
            seq_len=256,
            warmup_steps=3,
            rank=32,
            eval_limit=32,
            eval_batch=16,
            max_gen_toks=256,  # lm-eval's default; at 96 a perfect model would score at most about 34%
            lrs=dict(_LRS_FT_CPU),
        ),
        # one GPU, minutes per method: SmolLM2-135M-Instruct fine-tuned for one epoch of GSM8K train (7,473
        # problems; 468 steps of 16), then all 1,319 test problems with batched greedy generation
        "gpu": dict(
            _TRAIN,
            model="smollm2-135m",
            dtype="bfloat16",
            steps=468,
            mem_window=10,
            batch=16,
            seq_len=512,
            warmup_steps=20,
            rank=32,
            eval_limit=None,
            eval_batch=256,  # greedy generation of 256 tokens for 256 problems at a time (6 batches)
            max_gen_toks=256,
            lrs=dict(_LRS_FT),
            lr_grid=PAPER_LR_GRID,
        ),
        "paper": dict(
            _TRAIN,
            model="llama-2-7b",
            base="meta-llama/Llama-2-7b-hf",
            dtype="bfloat16",
            steps=1000,
            mem_window=201,
            batch=4,  # micro-batch; x grad_accum 8 = a global batch of 32 sequences
            grad_accum=8,
            seq_len=512,
            warmup_steps=30,
            rank=32,
            lr_grid=PAPER_LR_GRID,
            eval_limit=None,
            eval_batch=32,
            max_gen_toks=256,
            lrs=dict(_LRS_PAPER_FT),
        ),
    },
    "humaneval": {
        "smoke": dict(
            _TRAIN,
            model="llama-tiny",
            steps=4,
            mem_window=3,
            batch=2,
            seq_len=128,
            eval_limit=2,
            max_gen_toks=8,
            eval_batch=2,
            lrs=dict(_LRS_FT),
            # a model with its own weights (--set model=smollm2-135m): two steps on short sequences
            pretrained=dict(steps=2, mem_window=1, seq_len=128),
        ),
        "cpu": dict(
            _TRAIN,
            model="llama-cpu",
            base="c4",
            base_steps=300,
            steps=32,
            mem_window=6,
            batch=2,
            seq_len=256,
            warmup_steps=3,
            rank=32,
            eval_limit=16,
            eval_batch=16,
            max_gen_toks=96,
            lrs=dict(_LRS_FT_CPU),
        ),
        # one GPU, minutes per method: SmolLM2-135M-Instruct on 300 steps of 16 standard-library function
        # completions, then all 164 HumanEval problems
        "gpu": dict(
            _TRAIN,
            model="smollm2-135m",
            dtype="bfloat16",
            steps=300,
            mem_window=10,
            batch=16,
            seq_len=512,
            warmup_steps=15,
            rank=32,
            eval_limit=None,
            eval_batch=32,
            max_gen_toks=512,
            lrs=dict(_LRS_FT),
            lr_grid=PAPER_LR_GRID,
        ),
        "paper": dict(
            _TRAIN,
            model="llama-3.2-1b",
            base="meta-llama/Llama-3.2-1B",
            dtype="bfloat16",
            steps=1000,
            mem_window=201,
            batch=4,  # micro-batch; x grad_accum 8 = a global batch of 32 sequences
            grad_accum=8,
            seq_len=1024,
            warmup_steps=30,
            rank=32,
            lr_grid=PAPER_LR_GRID,
            eval_limit=None,
            eval_batch=16,
            max_gen_toks=512,
            lrs=dict(_LRS_PAPER_FT),
        ),
    },
}


# what a suite's records say about its data (suites/evaluate/tasks/c4.py: offline it trains and validates
# on Wikipedia)
SUITE_FIELDS = {"c4": {"train_corpus": "wikipedia-en train", "eval_corpus": "wikipedia-en validation"}}

# profile entries that are not --set keys
INTERNAL_KEYS = ("lrs", "lr_override", "per_method", "pretrained", "lr_grid")
# shared optimizer keys that `KEY.METHOD=value` may set for one method (budgets stay shared)
PER_METHOD_KEYS = ("betas", "eps", "weight_decay", "rank")


class ProfileError(ValueError):
    """Bad user input about a profile (unknown key, malformed value, impossible budget)."""


def profile(suite: str, name: str) -> dict:
    if suite not in PROFILES:
        raise ProfileError(f"unknown suite {suite!r}; choose from {', '.join(PROFILES)}")
    if name not in PROFILES[suite]:
        raise ProfileError(
            f"unknown profile {name!r} for suite {suite}; choose from {', '.join(PROFILES[suite])}"
        )
    return copy.deepcopy(PROFILES[suite][name])


def parse_value(key: str, text: str, witness):
    """Parse `text` as the type of `witness` (the current value of `key`); ProfileError if it does not fit."""
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ProfileError(f"--set {key}={text}: not a valid value") from None
    if isinstance(witness, bool):
        if not isinstance(value, bool):
            raise ProfileError(f"--set {key}={text}: expected true or false")
        return value
    if isinstance(witness, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProfileError(f"--set {key}={text}: expected an integer")
        return value
    if isinstance(witness, float):
        if isinstance(value, str):  # yaml reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ProfileError(f"--set {key}={text}: expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ProfileError(f"--set {key}={text}: expected a number")
        return float(value)
    if isinstance(witness, (tuple, list)):
        parts = [p for p in text.replace("(", "").replace(")", "").split(",") if p.strip()]
        try:
            nums = tuple(float(p) for p in parts)
        except ValueError:
            raise ProfileError(
                f"--set {key}={text}: expected {len(witness)} comma-separated numbers"
            ) from None
        if len(nums) != len(witness):
            raise ProfileError(f"--set {key}={text}: expected {len(witness)} comma-separated numbers")
        return nums
    if isinstance(witness, str):
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ProfileError(f"--set {key}={text}: expected a string")
        return str(text)
    # witness None: an optional integer (eval_limit) or any scalar
    if value is None or (isinstance(text, str) and text.lower() in ("none", "null", "all")):
        return None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        return value
    raise ProfileError(f"--set {key}={text}: expected a scalar")


def parse_assignment(text: str, flag: str = "--set") -> tuple[str, str]:
    """'key=value' -> (key, value); `flag` names the option in the error message."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        form = "key=value1,value2,..." if flag == "--sweep" else "key=value"
        raise ProfileError(f"{flag} {text}: expected {form}")
    return key, value


def apply_overrides(prof: dict, overrides: list[tuple[str, str]], method_keys: dict) -> dict:
    """Apply `key=value` overrides to a profile; `method_keys` maps extra allowed keys to type witnesses.

    `lr=X` sets every method's learning rate; `lr.NAME=X` sets one method's.
    """
    from suites.core.registry import option_witnesses

    prof = copy.deepcopy(prof)
    method_keys = {**option_witnesses(), **method_keys}  # options (lora_targets, ...) are method keys too
    given = {key.split(".", 1)[0] for key, _ in overrides}
    for key, text in overrides:
        if key == "lr":
            value = parse_value(key, text, 1.0)
            prof["lrs"] = {k: value for k in prof["lrs"]}
            prof["lr_override"] = value
        elif "." in key and key.split(".", 1)[0] in PER_METHOD_KEYS + tuple(method_keys):
            # KEY.METHOD=value: one method's hyper-parameter (e.g. betas.ldadam=0.908,0.99)
            base, method = key.split(".", 1)
            witness = prof[base] if base in prof else method_keys[base]
            prof.setdefault("per_method", {}).setdefault(method, {})[base] = parse_value(key, text, witness)
        elif key.startswith("lr."):
            prof["lrs"][key[3:]] = parse_value(key, text, 1.0)
        elif key == "dtype":
            try:
                prof[key] = dtypes.canonical(text)  # `bf16` is accepted; records say `bfloat16`
            except ValueError as exc:
                raise ProfileError(f"--set {key}={text}: {exc}") from None
        elif key in prof and key not in INTERNAL_KEYS:
            witness = prof[key]
            if key == "eval_limit":
                witness = None if text.strip().lower() in ("none", "null", "all") else 0
            prof[key] = parse_value(key, text, witness)
        elif key in method_keys:
            prof[key] = parse_value(key, text, method_keys[key])
        else:
            known = sorted({k for k in prof if k not in INTERNAL_KEYS} | set(method_keys)
                           | {"lr", "lr.METHOD"})
            raise ProfileError(f"unknown key {key!r} for --set/--sweep; known keys: {', '.join(known)}")
    _apply_pretrained(prof, given)
    _check_budget(prof)
    return prof


def _apply_pretrained(prof: dict, given: set) -> None:
    """A profile's `pretrained` budget replaces its own when the model brings its own weights (a 135M
    pretrained model in place of a tiny random one: fewer, shorter steps keep a smoke run short on CPU);
    keys set on the command line stay as given."""
    from suites.core.presets import carries_weights

    if "pretrained" in prof and carries_weights(prof["model"]):
        prof.update({k: v for k, v in prof["pretrained"].items() if k not in given})


def _check_budget(prof: dict) -> None:
    for key in ("steps", "batch", "seq_len", "grad_accum", "world_size"):
        if not isinstance(prof[key], int) or prof[key] < 1:
            raise ProfileError(f"{key} must be a positive integer, got {prof[key]!r}")
    if prof["steps"] < 2:
        raise ProfileError("steps must be at least 2 (one warm-up step and a measured window)")
    if not 1 <= prof["mem_window"] <= prof["steps"] - 1:
        raise ProfileError(
            f"mem_window must be in [1, steps-1] = [1, {prof['steps'] - 1}], got {prof['mem_window']}"
        )
    if prof["rank"] < 1:
        raise ProfileError(f"rank must be a positive integer, got {prof['rank']}")
    if prof["schedule"] not in ("cosine", "constant"):
        raise ProfileError(f"schedule must be cosine or constant, got {prof['schedule']!r}")
    if prof["dtype"] not in dtypes.CANONICAL:
        raise ProfileError(f"dtype must be one of {', '.join(dtypes.CANONICAL)}, got {prof['dtype']!r}")


def resolve(suite: str, profile_name: str, prof: dict, method: str, defaults: dict, device: str) -> dict:
    """The fully resolved config of one run (what is hashed and recorded).

    Only the method's own hyper-parameters (the keys of `defaults`) are included, so a key that a
    method does not use never changes its hash and a resumed sweep still skips it.
    """
    cfg = {"suite": suite, "profile": profile_name, "method": method, "device": device}
    cfg.update({k: prof[k] for k in _TRAIN if k not in _OPTIONAL or prof[k] != _OPTIONAL[k]})
    cfg.update(SUITE_FIELDS.get(suite, {}))
    for key, value in defaults.items():
        if key in PER_METHOD_KEYS:
            # a method's published optimizer constants (LDAdam's betas, GaLore's eps) beat the profile's
            # shared default; `--set KEY.METHOD=...` still overrides them below
            cfg[key] = value
        elif key != "lr":
            cfg[key] = prof.get(key, value)
    from suites.core.registry import method_options

    # a method's options are in its config only when set, so a run of the defaults keeps its hash
    cfg.update({k: prof[k] for k in method_options(method) if k in prof})
    cfg["lr"] = prof["lrs"].get(method, prof["lrs"]["default"])
    cfg.update(prof.get("per_method", {}).get(method, {}))
    cfg["betas"] = tuple(cfg["betas"])
    return cfg
