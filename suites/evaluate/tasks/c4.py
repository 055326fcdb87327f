"""C4-style pretraining from random init on offline English Wikipedia.

Offline, the suite trains on packed English Wikipedia train shards (documents in a seeded order) and
validates on the held-out Wikipedia validation shard: `eval_loss`, `eval_ppl` (records name both corpora in
`config.train_corpus` / `config.eval_corpus`). `c4_sample_loss`, `c4_sample_ppl`: the same loss on 1,000
documents of C4's en *train* split that the suite never trains on (a C4-like sample, not C4 validation).
Each on its first `eval_tokens` tokens.

Without the offline folder and with the Hub allowed (`suites.train.sources`), the suite reads C4 itself: it
trains
on `allenai/c4` en train in stream order after the 1,000 documents of the sample, validates on `allenai/c4`
en validation (`eval_loss`), and scores the same C4 sample, read from the Hub's first en train shard.
`metrics.data` of the record names what was read; `config.train_corpus` / `eval_corpus` name the offline
corpora the profiles were made for.
"""

from __future__ import annotations

import torch

from suites.core.profiles import option
from suites.evaluate.tasks._eval import mean_nll, ppl
from suites.train import data, sources, unigram

FINETUNE = False
HEADLINE = "eval_loss"
SUMMARY = ("eval_loss", "c4_sample_loss")  # the summary table
# held-out corpus of each evaluated metric prefix (`evaluate`); `val` (val_tokens > 0) is the slice of the
# Wikipedia validation file after the eval_loss tokens: disjoint from training and from eval_loss, so a
# learning rate can be chosen on it without looking at the reported numbers
CORPORA = (("wikipedia", "eval"), ("c4", "c4_sample"))


def check_data() -> None:
    sources.check("c4-sample", "train")
    sources.check("c4-corpus", "train", "validation")
    if sources.source("c4-corpus", "train") == "offline" and not list(
            sources.offline_path("c4-corpus", "train").glob("train-*.jsonl.gz")):
        raise sources.DataMissing(
            f"missing data: expected train-*.jsonl.gz under {sources.data_dir() / 'wikipedia-en'}"
        )


def train_batches(tokenizer, cfg: dict) -> list[dict]:
    return data.wikipedia_train_batches(
        tokenizer, steps=cfg["steps"], batch=cfg["batch"], seq_len=cfg["seq_len"], seed=cfg["seed"]
    )


def before_training(model, tokenizer, cfg: dict, device: str) -> dict:
    """Held-out loss of the model a run starts from (recorded as `metrics.step0`)."""
    return evaluate(model, tokenizer, cfg, device)


def heldout_loss(model, tokenizer, cfg: dict, device: str) -> float:
    """`eval_loss` alone: the loss curve's periodic point (`eval_every`)."""
    batches = data.heldout_batches(
        "wikipedia", tokenizer, n_tokens=cfg["eval_tokens"], batch=cfg["eval_batch"], seq_len=cfg["seq_len"]
    )
    return mean_nll(model, batches, device)


def eval_batches(corpus: str, tokenizer, cfg: dict) -> list[dict]:
    return data.heldout_batches(
        corpus, tokenizer, n_tokens=cfg["eval_tokens"], batch=cfg["eval_batch"], seq_len=cfg["seq_len"]
    )


def validation_batches(tokenizer, cfg: dict) -> list[dict]:
    """`val_tokens` tokens of the Wikipedia validation file right after the `eval_loss` tokens (the file is
    packed in order, so the first blocks of a longer read are exactly the eval blocks)."""
    seq = cfg["seq_len"]
    n_eval, n_val = max(1, cfg["eval_tokens"] // seq), max(1, option(cfg, "val_tokens") // seq)
    blocks = torch.cat([b["input_ids"] for b in data.heldout_batches(
        "wikipedia", tokenizer, n_tokens=(n_eval + n_val) * seq, batch=cfg["eval_batch"], seq_len=seq)])
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()}
            for b in blocks[n_eval:].split(cfg["eval_batch"])]


def evaluate(model, tokenizer, cfg: dict, device: str) -> dict:
    metrics = {}
    for corpus, name in CORPORA:
        batches = eval_batches(corpus, tokenizer, cfg)
        loss = mean_nll(model, batches, device)
        metrics[f"{name}_loss"] = loss
        metrics[f"{name}_ppl"] = ppl(loss)
    metrics["eval_tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
    if option(cfg, "val_tokens"):
        metrics["val_loss"] = mean_nll(model, validation_batches(tokenizer, cfg), device)
    return metrics


def reference(tokenizer, cfg: dict) -> dict:
    """The unigram reference (`suites.train.unigram`) of the run's own training tokens on each
    evaluated corpus."""
    train = train_batches(tokenizer, {**cfg, "steps": cfg["steps"] * cfg["grad_accum"]})
    size = unigram.vocab_size(tokenizer)
    out = {f"unigram_{name}_loss": unigram.unigram_nll(train, eval_batches(corpus, tokenizer, cfg), size)
           for corpus, name in CORPORA}
    if option(cfg, "val_tokens"):
        out["unigram_val_loss"] = unigram.unigram_nll(train, validation_batches(tokenizer, cfg), size)
    return out


def tracking_batch(tokenizer, cfg: dict) -> dict:
    """The tracking diagnostic's held-out batch (`suites.measure.tracking`): the first `track_tokens` tokens
    of the C4 sample, one batch."""
    seq = cfg["seq_len"]
    rows = max(1, option(cfg, "track_tokens") // seq)
    return data.heldout_batches("c4", tokenizer, n_tokens=rows * seq, batch=rows, seq_len=seq)[0]
