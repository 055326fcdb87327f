"""Tokenizers: the offline LLaMA-format SentencePiece tokenizer (`mistral-v1-sp32k`) and the project's own
byte-level BPE vocabularies trained from Wikipedia (`PROJECT_BPE`), both cached under `.cache/tokenizers/`,
and the id a token cache is keyed by."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from suites.core import files
from suites.train import sources

TOKENIZER_NAME = "mistral-v1-sp32k"


def load_tokenizer(name: str = TOKENIZER_NAME):
    """A tokenizer of the project's own, by name: `mistral-v1-sp32k` (the offline LLaMA SentencePiece; its
    converted fast form is cached, converting is slow) or `wikibpe-<vocab>` (a byte-level BPE the project
    trains from the Wikipedia train shards, cached; see `wiki_bpe`)."""
    if name == TOKENIZER_NAME:
        return _sp32k()
    if name in PROJECT_BPE:
        return wiki_bpe(**PROJECT_BPE[name])
    raise ValueError(f"unknown tokenizer {name!r}; choose from {', '.join(PROJECT_TOKENIZERS)}")


def check_tokenizer(name: str) -> None:
    """DataMissing (naming the path) unless the data a project tokenizer is made from is present."""
    if name == TOKENIZER_NAME:
        sources.require(f"tokenizers/{TOKENIZER_NAME}")
    elif name in PROJECT_BPE:
        sources.require(f"wikipedia-en/{PROJECT_BPE[name]['shard']}")
    else:
        raise ValueError(f"unknown tokenizer {name!r}; choose from {', '.join(PROJECT_TOKENIZERS)}")


def _sp32k():
    from transformers import AutoTokenizer


    source = sources.require(f"tokenizers/{TOKENIZER_NAME}")
    digest = hashlib.sha256((source / "tokenizer.model").read_bytes()).hexdigest()[:12]
    cached = sources.CACHE_DIR / "tokenizers" / f"{TOKENIZER_NAME}-{digest}"
    if (cached / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(cached)
    else:
        tok = AutoTokenizer.from_pretrained(source)
        files.atomic_dir(cached, tok.save_pretrained)  # a concurrent run's identical copy may win
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token  # padding positions are masked out of attention and loss
    tok.model_max_length = 1 << 30  # we pack and truncate ourselves
    tok.oasis_id = TOKENIZER_NAME
    return tok


# ---------------------------------------------------------------- the project's own BPE vocabulary

# Byte-level BPE trained by the project (issue 12: a CPU model shaped like an LLM needs a small vocabulary).
# Bump when the training code changes what it produces: it is part of the cache key.
BPE_CODE_VERSION = 1
BPE_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2: pad/bos/eos of suites.train.models.llama_config
PROJECT_BPE = {
    # name -> wiki_bpe arguments: the first shard of the Wikipedia train split, every document, file order
    "wikibpe-8k": dict(vocab=8192, shard="train-00000-of-00010.jsonl.gz", docs=None),
}
PROJECT_TOKENIZERS = (TOKENIZER_NAME, *PROJECT_BPE)


def wiki_bpe_key(*, vocab: int, shard: str, docs: int | None) -> dict:
    """Everything that determines the trained vocabulary (the cache key): training code version,
    `tokenizers` version, vocabulary size, special tokens, and the exact bytes of the training documents."""
    import tokenizers

    source = sources.require(f"wikipedia-en/{shard}")
    return {
        "code": BPE_CODE_VERSION,
        "tokenizers": tokenizers.__version__,
        "vocab": vocab,
        "specials": list(BPE_SPECIALS),
        "min_frequency": 2,
        "shard": shard,
        "shard_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "docs": docs,
    }


def train_wiki_bpe(texts, vocab: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts` (in the given order), single-threaded
    so that the result cannot depend on thread scheduling; BOS is prepended by the post-processor like
    the LLaMA tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    bos = BPE_SPECIALS[1]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=list(BPE_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(texts)
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by `tokenizers` at every parallel section
    try:
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    return tok


def _wrap_bpe(tokenizer_json: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), pad_token=BPE_SPECIALS[0], bos_token=BPE_SPECIALS[1],
        eos_token=BPE_SPECIALS[2],
    )
    tok.model_max_length = 1 << 30
    return tok


def wiki_bpe(*, vocab: int, shard: str, docs: int | None):
    """The project's BPE tokenizer, trained once from `docs` documents (all when None) of one Wikipedia
    train shard in file order and cached under .cache/tokenizers/ by a digest of `wiki_bpe_key`."""
    from suites.core.files import atomic_dir, write_json

    key = wiki_bpe_key(vocab=vocab, shard=shard, docs=docs)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"wikibpe{vocab}-{digest}"
    cached = sources.CACHE_DIR / "tokenizers" / name

    def fill(tmp: Path) -> None:
        rows = sources.read_jsonl(sources.require(f"wikipedia-en/{shard}"))
        texts = [d["text"] for d in rows][: docs or None]
        train_wiki_bpe(texts, vocab).save(str(tmp / "tokenizer.json"))
        write_json(tmp / "key.json", key)

    if not (cached / "tokenizer.json").exists():
        atomic_dir(cached, fill)
    tok = _wrap_bpe(cached / "tokenizer.json")
    tok.oasis_id = name
    return tok


def tokenizer_id(tokenizer) -> str:
    """The name that identifies a tokenizer in cache keys and records (set by the loaders)."""
    return getattr(tokenizer, "oasis_id", None) or str(tokenizer.name_or_path)


# part of every token cache key: bump when what a cache file holds changes (2: the rows' provenance beside
# the tokens, so a cached run's record still names the rows it was made from)
