"""Models by name or path (DESIGN §3.3, §6): what `--set model=` and `suites.memory --model` accept.

A model spec is one of
    a preset        a shape of this file (`llama-mini`, `llama-2-7b`, ...): random init, or the project's own
                    pretrained base (`base: c4`); its tokenizer is the project's (`Shape.tokenizer`)
    a named file    `smollm2-135m`: SmolLM2-135M-Instruct, the GGUF under the data folder (`WEIGHTS`)
    a GGUF file     `path/to/model.gguf`: dequantized once by transformers (`gguf_file=`, needs the
                    `gguf` and `accelerate` packages), cached as safetensors + config + tokenizer under
                    `.cache/models/<name>-<sha256 of the file, 12 hex>/`; later loads take seconds
    a local folder  a Hugging Face model directory (config.json + weights, tokenizer if it has one)
    a hub id        `org/name`, loaded by transformers when it is reachable or in the local HF cache
A model with weights brings its own tokenizer and prompt format (its chat template when it has one).
Everything that cannot be had (missing file or package, hub id not available offline) is a
`ModelUnavailable` (a ValueError) with a one-line message.

For a run: `run_fields(cfg)` (at planning time) adds what the record must say about the model's source,
tokenizer and prompt format; `load_tokenizer(cfg)` and `load_model(cfg, base_dir)` (in the run's process)
give the tokenizer and the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load where they are used: `suites.core.presets` is read while a
    import torch  # command line is checked, which must answer in well under a second
    from transformers import LlamaConfig, LlamaForCausalLM

from suites.core.presets import PRESETS, WEIGHTS, carries_weights  # noqa: F401 (WEIGHTS: the named files)

GGUF_PACKAGES = ("gguf", "accelerate")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelUnavailable(ValueError):
    """A model spec that cannot be loaded here (bad name, missing file or package, hub id offline)."""


def llama_config(name: str, **overrides) -> LlamaConfig:
    """A `LlamaConfig` for a preset name; `overrides` go straight to LlamaConfig."""
    from transformers import LlamaConfig

    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {', '.join(PRESETS)}")
    s = PRESETS[name]
    kwargs = dict(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads or s.heads,
        max_position_embeddings=s.max_positions,
        tie_word_embeddings=s.tied,
        rope_theta=s.rope_theta,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def build_model(config: LlamaConfig | str, *, dtype: torch.dtype | None = None, seed: int = 0,
                device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """Random-init Llama from a preset name or a config, deterministic in `seed` (float32 by default)."""
    import torch
    from transformers import LlamaForCausalLM

    if isinstance(config, str):
        config = llama_config(config)
    config._attn_implementation = "eager" if str(device) == "cpu" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype or torch.float32)


def enable_checkpointing(model) -> None:
    """Hugging Face activation checkpointing of every decoder layer, non-reentrant: the one mode in which
    OASIS tells a recompute from a first forward (oasis/linear.py); the KV cache is off, as training needs."""
    model.config.use_cache = False
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of the seven Llama projections, for rank validation without building a model."""
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    q = config.num_attention_heads * hd
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def parameter_counts(config) -> dict[str, int]:
    """Parameters of a Llama config by kind: embedding + lm_head (counted once when tied), the seven
    linear projections of every layer, and norms; `embedding_share` = embedding + lm_head over all."""
    h, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    linear = layers * sum(o * i for o, i in linear_shapes(config).values())
    embed = v * h * (1 if config.tie_word_embeddings else 2)
    norms = (2 * layers + 1) * h
    total = linear + embed + norms
    return {"embedding": embed, "linear": linear, "norms": norms, "total": total,
            "embedding_share": embed / total}


# ------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """Where a model spec's architecture and weights come from."""

    spec: str  # what the user wrote
    kind: str  # preset | gguf | local | hub
    path: Path | None = None  # the GGUF file or the local folder

    @property
    def has_weights(self) -> bool:
        return self.kind != "preset"


def resolve(spec: str) -> Source:
    """Classify a model spec; ModelUnavailable (one line) when it names nothing loadable here."""
    from suites.train.sources import data_dir

    spec = str(spec)
    if spec in PRESETS:
        return Source(spec, "preset")
    if spec in WEIGHTS:
        path = data_dir() / WEIGHTS[spec]
        if not path.is_file():
            raise ModelUnavailable(
                f"model {spec}: missing file {path} (put the offline copy there or set OASIS_DATA_DIR "
                f"to the folder that holds {WEIGHTS[spec].split('/')[0]}/)")
        return Source(spec, "gguf", path)
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelUnavailable(f"model {spec}: no such GGUF file")
        return Source(spec, "gguf", path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelUnavailable(f"model {spec}: folder has no config.json "
                                   "(not a Hugging Face model folder)")
        return Source(spec, "local", path.resolve())
    if path.exists():
        raise ModelUnavailable(f"model {spec}: not a GGUF file (.gguf) or a Hugging Face model folder")
    if spec.startswith((".", "/", "~")):
        raise ModelUnavailable(f"model {spec}: no such file or folder")
    if _HUB_ID.match(spec):
        return Source(spec, "hub")
    names = ", ".join([*PRESETS, *WEIGHTS])
    raise ModelUnavailable(f"unknown model {spec!r}: give a preset or named model ({names}), a GGUF file, "
                           "a Hugging Face model folder or a hub id (org/name)")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_root() -> Path:
    from suites.train.sources import CACHE_DIR

    return CACHE_DIR / "models"


# bumped when the conversion changes what it writes, so that a stale converted copy is never reused
CONVERSION = 2  # 2: the tokenizer's eos and pad tokens are the model config's (see ensure_converted)


def converted_dir(path: Path, sha256: str) -> Path:
    """Where the converted copy of a GGUF file lives: named by the file, its content digest and the
    conversion's version."""
    return _cache_root() / f"{path.stem.lower()}-{sha256[:12]}-c{CONVERSION}"


def require_packages(names, why: str) -> None:
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise ModelUnavailable(f"{why} needs the {' and '.join(missing)} package{'s' * (len(missing) > 1)}: "
                               f"pip install {' '.join(missing)}")


def ensure_converted(path: Path) -> Path:
    """The converted (dequantized, float32 safetensors + config + tokenizer) copy of a GGUF file, made
    the first time (tens of seconds to minutes on 2 cores) and cached; later calls only hash the file."""
    sha = file_sha256(path)
    final = converted_dir(path, sha)
    if (final / "config.json").is_file():
        return final
    require_packages(GGUF_PACKAGES, f"reading the GGUF file {path.name}")
    print(f"converting {path.name} once (dequantizing GGUF weights); cached in {final}", file=sys.stderr)

    def fill(tmp: Path) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from suites.core.files import write_json

        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # transformers before 5.2x read the GGUF's special tokens wrongly (SmolLM2: eos "<|im_start|>",
        # no pad), which ends every chat turn with the wrong token; the model config has the GGUF's own ids
        for role in ("eos", "pad"):
            token_id = getattr(model.config, f"{role}_token_id", None)
            if isinstance(token_id, int) and getattr(tokenizer, f"{role}_token_id") != token_id:
                setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
        # the weights are plain float32 tensors now; what stays is the GGUF marker that blocks saving
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "SOURCE.json", {"gguf_file": path.name, "sha256": sha, "bytes": path.stat().st_size,
                                         "transformers": transformers.__version__, "conversion": CONVERSION,
                                         "gguf": _version("gguf"), "dtype": "float32"})

    from suites.core.files import atomic_dir

    return atomic_dir(final, fill)


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _hub_config(spec: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:  # not cached and no hub: transformers raises OSError
        offline = os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0")
        why = "HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache" if offline else \
            str(exc).strip().splitlines()[0][:200]
        raise ModelUnavailable(f"model {spec}: hub id not available ({why}); on a machine with hub "
                               "access set HF_HUB_OFFLINE=0 (and `huggingface-cli login` for gated weights)"
                               ) from None


def weights_dir(source: Source) -> str:
    """What `from_pretrained` reads for a source with weights: the converted GGUF copy, the folder, the id."""
    if source.kind == "gguf":
        return str(ensure_converted(source.path))
    if source.kind == "local":
        return str(source.path)
    if source.kind == "hub":
        _hub_config(source.spec)
        return source.spec
    raise ValueError(f"model {source.spec} is a preset: it has no weights to load")


def model_config(spec: str):
    """The transformers config of a model spec (a GGUF file is converted the first time)."""
    source = resolve(spec)
    if source.kind == "preset":
        return llama_config(spec)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(weights_dir(source))


# ------------------------------------------------------------------------------------- for a run


def weights_spec(cfg: dict) -> str | None:
    """The spec whose weights a run starts from, or None for a preset (random init or the c4 base).
    `base` set to a hub id or path (the paper profiles) names the weights of the preset's shape."""
    if cfg.get("base") not in (None, "random", "c4", "pretrained"):
        return cfg["base"]
    return cfg["model"] if carries_weights(cfg["model"]) else None


def _local_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _project_tokenizer_for_vocab(vocab: int) -> str | None:
    from suites.train.tokenizers import PROJECT_TOKENIZERS

    by_vocab = {s.vocab: s.tokenizer for s in PRESETS.values() if s.tokenizer in PROJECT_TOKENIZERS}
    return by_vocab.get(vocab)


def tokenizer_source(cfg: dict) -> tuple[str, str]:
    """("project", name) for a project tokenizer, or ("model", dir_or_id) for the model's own."""
    spec = weights_spec(cfg)
    if spec is None:
        return "project", PRESETS[cfg["model"]].tokenizer
    source = resolve(spec)
    where = weights_dir(source)
    if source.kind == "local" and not _local_tokenizer_files(source.path):
        # a folder saved by this project (a pretrained base) holds no tokenizer: it reads the project's
        name = _project_tokenizer_for_vocab(model_config(spec).vocab_size)
        if name is None:
            raise ModelUnavailable(f"model {spec}: folder has no tokenizer files and its vocabulary matches "
                                   "no project tokenizer")
        return "project", name
    return "model", where


def load_tokenizer(cfg: dict):
    """The tokenizer of a run: the project's for presets, the model's own for a model with weights."""
    from suites.train import tokenizers

    kind, where = tokenizer_source(cfg)
    if kind == "project":
        return tokenizers.load_tokenizer(where)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(where)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding positions are masked out of attention and loss
    tok.model_max_length = 1 << 30
    tok.oasis_id = _tokenizer_id(cfg, where)
    return tok


def _tokenizer_id(cfg: dict, where: str) -> str:
    """A model's own tokenizer is named by its model: the GGUF digest, the folder name, the hub id."""
    source = resolve(weights_spec(cfg))
    if source.kind == "gguf":
        return f"gguf:{Path(where).name}"
    if source.kind == "local":
        return f"local:{source.path.name}"
    return f"hub:{source.spec}"


def run_fields(cfg: dict) -> dict:
    """What a run's config (and so its record and hash) says about the model: where its weights come
    from (`model_source`), which tokenizer reads its text, its prompt format, and `base: pretrained`
    when the model brings its own weights. Called once when a run is planned."""
    from suites.train import data, tokenizers

    spec = weights_spec(cfg)
    if spec is None:
        name = PRESETS[cfg["model"]].tokenizer
        tokenizers.check_tokenizer(name)
        return {"model_source": {"kind": "preset", "spec": cfg["model"]}, "tokenizer": name,
                "prompt_format": "plain"}
    source = resolve(spec)
    record = {"kind": source.kind, "spec": spec}
    if source.kind == "gguf":
        record.update(file=source.path.name, sha256=file_sha256(source.path))
    tokenizer = load_tokenizer(cfg)
    fields = {"model_source": record, "tokenizer": tokenizers.tokenizer_id(tokenizer),
              "prompt_format": data.prompt_format_of(tokenizer),
              "base_seed": None}  # the weights are the model's own: no seed of ours made them
    if carries_weights(cfg["model"]):
        fields["base"] = "pretrained"
    return fields


def load_model(cfg: dict, base_dir: str | None = None):
    """The model a run trains, in cfg's dtype on cfg's device: random init of a preset (`base: random`),
    the project's pretrained base (`base: c4`, read from `base_dir`), or a model's own weights."""
    from transformers import AutoModelForCausalLM

    from suites.core import dtypes

    device, dtype = cfg["device"], dtypes.torch_dtype(cfg["dtype"])
    attn = "eager" if device == "cpu" else "sdpa"
    spec = weights_spec(cfg)
    if spec is None and cfg["base"] == "random":
        # the profile's base_seed, not the run's seed: every seed and method starts from the same weights
        return build_model(llama_config(cfg["model"]), dtype=dtype, seed=cfg["base_seed"], device=device)
    if spec is None:
        if base_dir is None:
            raise ValueError("base: c4 needs the pretrained base's folder")
        where = base_dir
    else:
        where = weights_dir(resolve(spec))
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=attn)
    return model.to(device)


class _quiet_loading:
    """No per-tensor progress bars from transformers while loading (a run draws its own)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self.was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        if self.was_enabled:
            hf_logging.enable_progress_bar()
        return False


def load_config_json(path: Path):
    """A transformers config from a config.json file (for `suites.memory --model path/config.json`)."""
    from transformers import AutoConfig

    with open(path) as f:
        raw = json.load(f)
    if "model_type" not in raw:
        raise ValueError(f"{path} has no model_type; not a transformers config")
    return AutoConfig.for_model(**raw)
