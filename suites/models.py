"""Model shapes used across the suite (DESIGN §6) and one way to build them.

Every number here is a published LLaMA shape or a small config of the project's own; nothing is
downloaded. `build_model` returns a randomly initialised `LlamaForCausalLM` (weights are loaded by
the tasks that need a pretrained base).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB_SP32K = 32000  # the offline LLaMA-format tokenizer (shared/data/tokenizers/mistral-v1-sp32k)


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int | None = None
    vocab: int = VOCAB_SP32K
    tied: bool = False
    max_positions: int = 4096
    rope_theta: float = 10000.0


PRESETS: dict[str, Shape] = {
    # project-own small configs (CPU profiles and tests)
    "llama-tiny": Shape(64, 172, 2, 4, vocab=VOCAB_SP32K, tied=True, max_positions=512),
    "llama-mini": Shape(256, 688, 4, 4, vocab=VOCAB_SP32K, tied=True, max_positions=1024),
    # published shapes (GaLore / OASIS papers)
    "llama-60m": Shape(512, 1376, 8, 8),
    "llama-130m": Shape(768, 2048, 12, 12),
    "llama-350m": Shape(1024, 2736, 24, 16),
    "llama-1b": Shape(2048, 5461, 24, 32),
    "llama-2-7b": Shape(4096, 11008, 32, 32),
    "llama-3.2-1b": Shape(2048, 8192, 16, 32, kv_heads=8, vocab=128256, tied=True, max_positions=131072,
                          rope_theta=500000.0),
}


def llama_config(name: str, **overrides) -> LlamaConfig:
    """A `LlamaConfig` for a preset name; `overrides` go straight to LlamaConfig."""
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


def build_model(config: LlamaConfig | str, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                device: str | torch.device = "cpu") -> LlamaForCausalLM:
    """Random-init Llama from a preset name or a config, deterministic in `seed`."""
    if isinstance(config, str):
        config = llama_config(config)
    config._attn_implementation = "eager" if str(device) == "cpu" else "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def linear_shapes(config: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of the seven Llama projections, for rank validation without building a model."""
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * hd
    q = config.num_attention_heads * hd
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
