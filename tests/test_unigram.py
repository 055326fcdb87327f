"""The unigram reference (`suites.train.unigram`) against hand-computed values, and as the c4/gsm8k suites
record it: from the run's own training tokens, on the evaluated tokens."""

import math
from collections import Counter

import pytest
import torch

from suites.core import profiles
from suites.core.registry import method_defaults
from suites.evaluate.tasks import c4, gsm8k
from suites.train import data, models, unigram
from suites.train.models import run_fields


def _batch(rows, labels=None):
    ids = torch.tensor(rows)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels is not None:
        out["labels"] = torch.tensor(labels)
    return out


def test_add_half_smoothing_by_hand():
    # targets after the shift: train [0, 0, 1] (the first position is never a target), eval [0, 3]
    train = [_batch([[2, 0, 0, 1]])]
    evaluation = [_batch([[1, 0, 3]])]
    # V = 4, N = 3: p(0) = 2.5 / 5, p(3) = 0.5 / 5
    expected = -(math.log(2.5 / 5) + math.log(0.5 / 5)) / 2
    assert unigram.unigram_nll(train, evaluation, 4) == pytest.approx(expected)


def test_ignored_labels_are_not_counted_nor_scored():
    train = [_batch([[2, 0, 0, 1]], labels=[[-100, -100, 0, 1]])]  # targets 0, 1
    evaluation = [_batch([[1, 0, 3]], labels=[[-100, -100, 3]])]  # target 3
    assert unigram.unigram_nll(train, evaluation, 4) == pytest.approx(-math.log(0.5 / (2 + 0.5 * 4)))


def _cfg(suite, **overrides):
    prof = profiles.profile(suite, "smoke")
    prof.update(overrides)
    cfg = profiles.resolve(suite, "smoke", prof, "adam", method_defaults("adam"), "cpu")
    return {**cfg, **run_fields(cfg)}


def _expected(train_ids, eval_ids, vocab):
    counts, n = Counter(train_ids), len(train_ids)
    return -sum(math.log((counts[t] + 0.5) / (n + 0.5 * vocab)) for t in eval_ids) / len(eval_ids)


def test_c4_reference_is_the_runs_own_training_tokens_on_the_eval_tokens():
    cfg = _cfg("c4", val_tokens=256)
    tok = models.load_tokenizer(cfg)
    train = [t for b in c4.train_batches(tok, cfg) for t in b["input_ids"][:, 1:].flatten().tolist()]
    ref = c4.reference(tok, cfg)
    held = data.heldout_batches("wikipedia", tok, n_tokens=cfg["eval_tokens"], batch=cfg["eval_batch"],
                                seq_len=cfg["seq_len"])
    eval_ids = [t for b in held for t in b["input_ids"][:, 1:].flatten().tolist()]
    assert ref["unigram_eval_loss"] == pytest.approx(_expected(train, eval_ids, len(tok)), rel=1e-9)
    assert {"unigram_c4_sample_loss", "unigram_val_loss"} <= set(ref)


def test_c4_validation_slice_follows_the_eval_tokens_and_is_disjoint_from_them():
    cfg = _cfg("c4", val_tokens=256)
    tok = models.load_tokenizer(cfg)
    n_eval = cfg["eval_tokens"] // cfg["seq_len"]
    longer = data.heldout_batches("wikipedia", tok, n_tokens=cfg["eval_tokens"] + 256, batch=1,
                                  seq_len=cfg["seq_len"])
    val = torch.cat([b["input_ids"] for b in c4.validation_batches(tok, cfg)])
    assert torch.equal(val, torch.cat([b["input_ids"] for b in longer[n_eval:]]))
    evaluated = torch.cat([b["input_ids"] for b in c4.eval_batches("wikipedia", tok, cfg)])
    assert torch.equal(evaluated, torch.cat([b["input_ids"] for b in longer[:n_eval]]))


def test_gsm8k_reference_scores_the_answer_tokens():
    cfg = _cfg("gsm8k")
    tok = models.load_tokenizer(cfg)
    train = [t for b in gsm8k.train_batches(tok, cfg) for t in b["labels"][:, 1:].flatten().tolist()
             if t != data.IGNORE]
    answers = [t for _, a in data.gsm8k_eval_pairs(tok, cfg["eval_limit"]) for t in a]
    assert gsm8k.reference(tok, cfg)["unigram_answer_nll"] == pytest.approx(
        _expected(train, answers, len(tok)), rel=1e-9)
