"""C4-style pretraining from random init on offline English Wikipedia.

Offline, the suite trains on packed English Wikipedia train shards (documents in a seeded order) and
validates on the held-out Wikipedia validation shard: `eval_loss`, `eval_ppl` (records name both corpora in
`config.train_corpus` / `config.eval_corpus`). `c4_sample_loss`, `c4_sample_ppl`: the same loss on 1,000
documents of C4's en *train* split that the suite never trains on (a C4-like sample, not C4 validation).
Each on its first `eval_tokens` tokens.
"""

from __future__ import annotations

from suites import data
from suites.tasks._eval import mean_nll, ppl

FINETUNE = False
HEADLINE = "eval_loss"
SUMMARY = ("eval_loss", "c4_sample_loss")  # the summary table


def check_data() -> None:
    data.require("wikipedia-en/validation-00000-of-00001.jsonl.gz")
    data.require("c4-sample/c4-en-train.00000-of-01024.first1000.jsonl")
    if not list(data.require("wikipedia-en").glob("train-*.jsonl.gz")):
        raise data.DataMissing(
            f"missing data: expected train-*.jsonl.gz under {data.data_dir() / 'wikipedia-en'}"
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


def evaluate(model, tokenizer, cfg: dict, device: str) -> dict:
    metrics = {}
    for corpus, name in (("wikipedia", "eval"), ("c4", "c4_sample")):
        batches = data.heldout_batches(
            corpus, tokenizer, n_tokens=cfg["eval_tokens"], batch=cfg["eval_batch"], seq_len=cfg["seq_len"]
        )
        loss = mean_nll(model, batches, device)
        metrics[f"{name}_loss"] = loss
        metrics[f"{name}_ppl"] = ppl(loss)
    metrics["eval_tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
    return metrics
