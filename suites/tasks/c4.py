"""C4-style pretraining from random init on offline English Wikipedia.

Train: packed Wikipedia train shards (documents in a seeded order). Metrics: token-weighted validation
loss and perplexity on the held-out Wikipedia validation shard (`eval_loss`, `eval_ppl`) and on the
real C4 sample (`c4_eval_loss`, `c4_eval_ppl`), the first `eval_tokens` tokens of each.
"""

from __future__ import annotations

from suites import data
from suites.tasks._eval import mean_nll, ppl

FINETUNE = False
HEADLINE = "eval_loss"


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


def evaluate(model, tokenizer, cfg: dict, device: str) -> dict:
    metrics = {}
    for corpus, prefix in (("wikipedia", ""), ("c4", "c4_")):
        batches = data.heldout_batches(
            corpus, tokenizer, n_tokens=cfg["eval_tokens"], batch=cfg["eval_batch"], seq_len=cfg["seq_len"]
        )
        loss = mean_nll(model, batches, device)
        metrics[f"{prefix}eval_loss"] = loss
        metrics[f"{prefix}eval_ppl"] = ppl(loss)
    metrics["eval_tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
    return metrics
