"""Suite data and scoring pieces, without training: fast, offline, real data and tokenizer."""

from __future__ import annotations

import os

import pytest
import torch

from suites.evaluate.tasks import humaneval
from suites.train import data, sources, tokenizers


@pytest.fixture(scope="module")
def tok():
    return tokenizers.load_tokenizer()


def test_gsm8k_batches_are_seeded_and_supervise_only_the_answer(tok):
    a = data.gsm8k_train_batches(tok, steps=3, batch=2, seq_len=256, seed=0)
    b = data.gsm8k_train_batches(tok, steps=3, batch=2, seq_len=256, seed=0)
    c = data.gsm8k_train_batches(tok, steps=3, batch=2, seq_len=256, seed=1)
    assert len(a) == 3 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    row_ids, row_labels, row_mask = a[0]["input_ids"][0], a[0]["labels"][0], a[0]["attention_mask"][0]
    supervised = row_labels != data.IGNORE
    first = int(supervised.nonzero()[0])
    prompt = tok.decode(row_ids[:first], skip_special_tokens=True)
    answer = tok.decode(row_ids[supervised], skip_special_tokens=True)
    assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
    assert "#### " in answer  # the reference answer with its final number is what the loss sees
    assert torch.equal(row_labels[supervised], row_ids[supervised])
    assert not supervised[row_mask == 0].any()  # padding carries no loss


def test_wikipedia_batches_are_packed_and_seeded(tok):
    a = data.wikipedia_train_batches(tok, steps=2, batch=2, seq_len=32, seed=0)
    b = data.wikipedia_train_batches(tok, steps=2, batch=2, seq_len=32, seed=0)
    assert [x["input_ids"].shape for x in a] == [torch.Size([2, 32])] * 2
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert all(torch.equal(x["labels"], x["input_ids"]) for x in a)
    held = data.heldout_batches("c4", tok, n_tokens=64, batch=2, seq_len=32)
    assert sum(int(x["attention_mask"].sum()) for x in held) == 64


def test_missing_data_names_the_expected_path(tmp_path, monkeypatch):
    monkeypatch.setenv("OASIS_DATA_DIR", str(tmp_path))
    with pytest.raises(sources.DataMissing, match=str(tmp_path / "gsm8k" / "train.jsonl")):
        data.gsm8k_examples("train")


def test_humaneval_canonical_solutions_pass_in_a_subprocess():
    problems = data.humaneval_problems(5)
    programs = [humaneval.program_for(p, p["canonical_solution"]) for p in problems]
    assert all(humaneval.run_program(program, 10.0) for program in programs)
    assert not humaneval.run_program(humaneval.program_for(problems[0], "    return None\n"), 10.0)


def test_humaneval_programs_never_run_in_the_harness_process():
    # the sandbox refuses writes outside its scratch directory, so the program checks its pid itself
    assert humaneval.run_program(f"import os\nassert os.getpid() != {os.getpid()}\n", 10.0)
    assert not humaneval.run_program(f"import os\nassert os.getpid() == {os.getpid()}\n", 10.0)
    assert not humaneval.run_program("while True:\n    pass\n", 1.0)  # the timeout kills it


def test_completion_is_cut_at_the_next_top_level_statement():
    text = "    return a + b\n\ndef other():\n    pass\n"
    assert humaneval.truncate(text) == "    return a + b\n"
