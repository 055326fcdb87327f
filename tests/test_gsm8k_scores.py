"""GSM8K's teacher-forced scores (`answer_scores`) against models whose predictions the test controls: an
oracle that predicts every next token, and the same oracle wrong at one chosen position."""

from types import SimpleNamespace

import pytest
import torch

from suites.evaluate.tasks import gsm8k
from suites.train import data, tokenizers

LIMIT = 6
CFG = {"eval_limit": LIMIT, "eval_batch": 4, "max_gen_toks": 256, "prompt_format": "plain"}


class Oracle(torch.nn.Module):
    """Logits that put the next input token first; `wrong(row_ids)` names positions predicted wrongly."""

    def __init__(self, vocab: int, wrong=lambda ids: []):
        super().__init__()
        self.vocab, self.wrong = vocab, wrong

    def forward(self, input_ids, attention_mask=None):
        nxt = torch.roll(input_ids, -1, dims=1)
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * 50.0
        for row, ids in enumerate(input_ids):
            for t in self.wrong(ids.tolist()):
                logits[row, t] = 0.0
                logits[row, t, (int(nxt[row, t]) + 1) % self.vocab] = 50.0
        return SimpleNamespace(logits=logits)


def _last_answer_position(ids: list[int], tok) -> int:
    """Index of the last token that is not padding / end of sequence (a digit of the final number)."""
    t = len(ids) - 1
    while ids[t] in (tok.pad_token_id, tok.eos_token_id):
        t -= 1
    return t


@pytest.fixture(scope="module")
def tok():
    return tokenizers.load_tokenizer()


def test_oracle_scores_every_final_answer_and_no_loss(tok):
    scores = gsm8k.answer_scores(Oracle(len(tok)), tok, CFG, "cpu")
    assert scores["final_answer_acc_tf"] == 1.0
    assert scores["answer_nll"] < 1e-6


def test_one_wrong_digit_fails_the_problem_but_a_wrong_reasoning_token_does_not(tok):
    # the logits at t predict token t + 1: being wrong at (last answer token - 1) misses a digit
    wrong_digit = Oracle(len(tok), lambda ids: [_last_answer_position(ids, tok) - 1])
    assert gsm8k.answer_scores(wrong_digit, tok, CFG, "cpu")["final_answer_acc_tf"] == 0.0
    prompts = [len(p) for p, _ in data.gsm8k_eval_pairs(tok, LIMIT)]
    first_row = {}

    def wrong_reasoning(ids):  # wrong on the solution's first token, long before "####"
        key = tuple(ids)
        first_row.setdefault(key, len(first_row))
        return [prompts[first_row[key] % LIMIT] - 1]

    scores = gsm8k.answer_scores(Oracle(len(tok), wrong_reasoning), tok, {**CFG, "eval_batch": LIMIT}, "cpu")
    assert scores["final_answer_acc_tf"] == 1.0 and scores["answer_nll"] > 1.0 / 200


def test_final_number_span_spells_the_number(tok):
    answer = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18"
    ids = tok(" " + answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    start, end = gsm8k.final_number_span(tok, answer, ids)
    assert end == len(ids) - 1  # the end-of-sequence token is not part of the number
    assert tok.decode(ids[start:end]).strip().endswith("18")
    assert not tok.decode(ids[start + 1:end]).strip().endswith("18")  # and it is the shortest such run


def test_generation_ceiling_counts_solutions_that_fit(tok):
    lengths = []
    for ex in data.gsm8k_examples("test")[:LIMIT]:
        _, a = data.encode_pair(tok, "plain", ex["question"], ex["answer"])
        lengths.append(len(a) - 1)  # without the end-of-sequence token
    budget = sorted(lengths)[LIMIT // 2]
    expected = sum(n <= budget for n in lengths) / LIMIT
    scores = gsm8k.answer_scores(Oracle(len(tok)), tok, {**CFG, "max_gen_toks": budget}, "cpu")
    assert scores["gen_ceiling"] == expected
    assert 0 < expected < 1
