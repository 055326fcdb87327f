"""Model presets by name, as data: the shapes a profile or `--set model=` names, and the named model files
with weights (`suites.train.models` builds and loads them). Imports nothing heavy, so a command line that
names a model is checked in well under a second."""

from __future__ import annotations

from dataclasses import dataclass

VOCAB_SP32K = 32000  # the offline LLaMA-format tokenizer (shared/data/tokenizers/mistral-v1-sp32k)
VOCAB_BPE8K = 8192  # the project's Wikipedia BPE (suites.train.tokenizers.PROJECT_BPE)


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
    tokenizer: str = "mistral-v1-sp32k"  # the project tokenizer a preset reads text with


PRESETS: dict[str, Shape] = {
    # project-own small configs (CPU profiles and tests)
    "llama-tiny": Shape(64, 172, 2, 4, vocab=VOCAB_SP32K, tied=True, max_positions=512),
    "llama-mini": Shape(256, 688, 4, 4, vocab=VOCAB_SP32K, tied=True, max_positions=1024),
    # shaped like an LLM at CPU scale (issue 12): the 8k BPE vocabulary keeps embeddings (tied with the
    # lm_head) under 25% of the parameters, so the linear layers dominate compute and memory as at 7B
    "llama-cpu": Shape(256, 688, 8, 4, vocab=VOCAB_BPE8K, tied=True, max_positions=1024,
                       tokenizer="wikibpe-8k"),
    # published shapes (GaLore / OASIS papers)
    "llama-60m": Shape(512, 1376, 8, 8),
    "llama-130m": Shape(768, 2048, 12, 12),
    "llama-350m": Shape(1024, 2736, 24, 16),
    "llama-1b": Shape(2048, 5461, 24, 32),
    "llama-2-7b": Shape(4096, 11008, 32, 32),
    "llama-3.2-1b": Shape(2048, 8192, 16, 32, kv_heads=8, vocab=128256, tied=True, max_positions=131072,
                          rope_theta=500000.0),
}

# named model files under the data folder (OASIS_DATA_DIR), loaded with their weights
WEIGHTS: dict[str, str] = {
    "smollm2-135m": "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf",
}


def carries_weights(spec: str) -> bool:
    """True when `spec` names a model with weights (anything but a preset); cheap, touches no file."""
    return spec not in PRESETS
