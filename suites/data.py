"""Offline data: where it lives, the tokenizer, and deterministic batches.

Data are read from `OASIS_DATA_DIR` (default `<repo>/../shared/data`) and never copied into the
repository. Every batch list is a pure function of (data, tokenizer, seed, sizes), so every method of
a profile sees the same data in the same order. Tokenised streams are cached under `.cache/tokens/`
(gitignored) because each run is its own process and would otherwise tokenise the same text again.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import sysconfig
from pathlib import Path

import torch

from suites import files

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache"
TOKENIZER_NAME = "mistral-v1-sp32k"
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


class DataMissing(FileNotFoundError):
    """A data file the run needs is not where it should be (user error: exit 2)."""


def data_dir() -> Path:
    env = os.environ.get("OASIS_DATA_DIR")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


def require(relative: str) -> Path:
    path = data_dir() / relative
    if not path.exists():
        raise DataMissing(
            f"missing data: expected {path} (put the offline copy there or set OASIS_DATA_DIR "
            f"to the folder that holds {relative.split('/')[0]}/)"
        )
    return path


def read_jsonl(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_tokenizer():
    """The offline LLaMA SentencePiece tokenizer (the converted fast form is cached: converting is slow)."""
    from transformers import AutoTokenizer

    source = require(f"tokenizers/{TOKENIZER_NAME}")
    digest = hashlib.sha256((source / "tokenizer.model").read_bytes()).hexdigest()[:12]
    cached = CACHE_DIR / "tokenizers" / f"{TOKENIZER_NAME}-{digest}"
    if (cached / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(cached)
    else:
        tok = AutoTokenizer.from_pretrained(source)
        files.atomic_dir(cached, tok.save_pretrained)  # a concurrent run's identical copy may win
    if tok.pad_token_id is None:
        tok.pad_token = tok.unk_token  # padding positions are masked out of attention and loss
    tok.model_max_length = 1 << 30  # we pack and truncate ourselves
    return tok


def _cached_tokens(key: dict, make) -> torch.Tensor:
    """A 1-D int32 token tensor cached under .cache/tokens/<digest of key>.pt."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE_DIR / "tokens" / f"{digest}.pt"
    if path.exists():
        return torch.load(path)
    tokens = make()
    buffer = io.BytesIO()
    torch.save(tokens, buffer)
    files.atomic_write(path, buffer.getvalue())
    return tokens


def _pack(texts, tokenizer, n_tokens: int) -> torch.Tensor:
    """Concatenate `BOS text EOS` until `n_tokens` tokens are collected."""
    out, total = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        out.append(torch.tensor(ids, dtype=torch.int32))
        total += len(ids)
        if total >= n_tokens:
            break
    if total < n_tokens:
        raise ValueError(f"corpus has only {total} tokens, {n_tokens} needed")
    return torch.cat(out)[:n_tokens]


def _blocks_to_batches(tokens: torch.Tensor, batch: int, seq_len: int, n_batches: int, seed: int | None):
    blocks = tokens[: n_batches * batch * seq_len].view(n_batches * batch, seq_len).long()
    if seed is not None:  # shuffle blocks so consecutive batches do not come from the same document
        g = torch.Generator().manual_seed(seed)
        blocks = blocks[torch.randperm(len(blocks), generator=g)]
    return [
        {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()}
        for b in blocks.split(batch)
    ]


# ---------------------------------------------------------------- Wikipedia / C4 (pretraining)


def wikipedia_train_batches(tokenizer, *, steps: int, batch: int, seq_len: int, seed: int) -> list[dict]:
    """`steps` packed batches from the Wikipedia train shards, documents in a seeded order."""
    shards = sorted(require("wikipedia-en").glob("train-*.jsonl.gz"))
    if not shards:
        raise DataMissing(f"missing data: expected train-*.jsonl.gz under {data_dir() / 'wikipedia-en'}")
    n_tokens = steps * batch * seq_len

    def docs():
        rng = random.Random(seed)
        order = list(shards)
        rng.shuffle(order)
        for shard in order:
            texts = [d["text"] for d in read_jsonl(shard)]
            rng.shuffle(texts)
            yield from texts

    key = {
        "corpus": "wikipedia-train",
        "shards": [s.name for s in shards],
        "seed": seed,
        "n": n_tokens,
        "tok": TOKENIZER_NAME,
    }
    tokens = _cached_tokens(key, lambda: _pack(docs(), tokenizer, n_tokens))
    return _blocks_to_batches(tokens, batch, seq_len, steps, seed)


def heldout_batches(corpus: str, tokenizer, *, n_tokens: int, batch: int, seq_len: int) -> list[dict]:
    """The first `n_tokens` tokens of a held-out corpus in file order ("wikipedia" validation or "c4")."""
    path = {
        "wikipedia": "wikipedia-en/validation-00000-of-00001.jsonl.gz",
        "c4": "c4-sample/c4-en-train.00000-of-01024.first1000.jsonl",
    }[corpus]
    source = require(path)
    n_blocks = max(1, n_tokens // seq_len)
    key = {"corpus": corpus, "file": source.name, "n": n_blocks * seq_len, "tok": TOKENIZER_NAME}
    tokens = _cached_tokens(
        key, lambda: _pack((d["text"] for d in read_jsonl(source)), tokenizer, n_blocks * seq_len)
    )
    blocks = tokens.view(n_blocks, seq_len).long()
    return [
        {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()}
        for b in blocks.split(batch)
    ]


# ---------------------------------------------------------------- GSM8K (fine-tuning)


def gsm8k_prompt(question: str) -> str:
    """The prompt of lm-eval's `gsm8k` task (doc_to_text), so training and evaluation agree."""
    return f"Question: {question}\nAnswer:"


def gsm8k_examples(split: str) -> list[dict]:
    return list(read_jsonl(require(f"gsm8k/{split}.jsonl")))


def _prompt_answer_ids(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt).input_ids  # with BOS
    a = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return p, a


def supervised_batch(pairs, tokenizer, seq_len: int | None = None) -> dict:
    """Right-padded batch of (prompt_ids, answer_ids); loss only on the answer tokens."""
    seq_len = seq_len or max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), seq_len), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, (p, a) in enumerate(pairs):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p) : n] = torch.tensor(a)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def gsm8k_train_batches(tokenizer, *, steps: int, batch: int, seq_len: int, seed: int) -> list[dict]:
    """`steps` batches of GSM8K train problems in a seeded order; problems longer than seq_len are skipped."""
    examples = gsm8k_examples("train")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    pairs = []
    for i in order:
        p, a = _prompt_answer_ids(tokenizer, gsm8k_prompt(examples[i]["question"]), examples[i]["answer"])
        if len(p) + len(a) <= seq_len:
            pairs.append((p, a))
        if len(pairs) == steps * batch:
            break
    if len(pairs) < steps * batch:  # more steps than problems: another epoch in the same order
        pairs = (pairs * (steps * batch // max(1, len(pairs)) + 1))[: steps * batch]
    return [supervised_batch(pairs[i : i + batch], tokenizer, seq_len) for i in range(0, len(pairs), batch)]


def gsm8k_eval_pairs(tokenizer, limit: int | None) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, answer_ids) of the first `limit` test problems, in lm-eval's order."""
    return [
        _prompt_answer_ids(tokenizer, gsm8k_prompt(ex["question"]), ex["answer"])
        for ex in gsm8k_examples("test")[: limit or None]
    ]


# ---------------------------------------------------------------- code (HumanEval fine-tuning)


def stdlib_sources() -> list[Path]:
    """The running interpreter's own standard-library Python sources (an offline code corpus), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo")
    files = [p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)]
    return sorted(files)


def code_train_batches(tokenizer, *, steps: int, batch: int, seq_len: int, seed: int) -> list[dict]:
    files = stdlib_sources()
    if not files:
        raise DataMissing(f"missing data: no Python sources under {sysconfig.get_paths()['stdlib']}")
    n_tokens = steps * batch * seq_len

    def texts():
        order = list(files)
        random.Random(seed).shuffle(order)
        for path in order:
            try:
                yield path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue

    key = {
        "corpus": "python-stdlib",
        "root": sysconfig.get_paths()["stdlib"],
        "n_files": len(files),
        "seed": seed,
        "n": n_tokens,
        "tok": TOKENIZER_NAME,
    }
    tokens = _cached_tokens(key, lambda: _pack(texts(), tokenizer, n_tokens))
    return _blocks_to_batches(tokens, batch, seq_len, steps, seed)


def humaneval_problems(limit: int | None) -> list[dict]:
    return list(read_jsonl(require("humaneval/HumanEval.jsonl.gz")))[: limit or None]
