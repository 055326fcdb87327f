"""Data from the Hub (`suites.train.sources`): the offline files, served as Hub-style datasets (a folder laid
out like the Hub repository, with the README `configs` the Hub uses) and read through `datasets.load_dataset`,
give every suite the same batches as the offline path, bit for bit; a record names the source and a digest of
the rows; offline with neither source is one line naming both ways, exit 2."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch

from suites import run
from suites.evaluate.tasks import c4, gsm8k
from suites.train import data, sources, tokenizers

OFFLINE = sources.data_dir()
CFG = {"steps": 3, "batch": 2, "seq_len": 256, "seed": 1, "eval_tokens": 512, "eval_batch": 2}


@pytest.fixture(scope="module")
def tok():
    return tokenizers.load_tokenizer()


def _readme(folder: Path, configs: dict) -> None:
    """A Hub dataset card declaring `configs` ({name: {split: path}}), as on the Hub repositories."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {path}" for split, path in splits.items()]
    (folder / "README.md").write_text("\n".join(lines + ["---", ""]))


def _gzip_lines(lines: list[bytes], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.writelines(lines)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Local Hub-style copies of openai/gsm8k, openai/openai_humaneval and allenai/c4 made from the
    offline files. The C4 copy's en train stream is the C4 sample followed by 200 Wikipedia validation
    documents (the part the suite trains on), its en validation the Wikipedia validation shard (so that the
    validation path can be compared with the offline one)."""
    root = tmp_path_factory.mktemp("hub")
    g = root / "gsm8k"
    (g / "main").mkdir(parents=True)
    for split in ("train", "test"):
        shutil.copy(OFFLINE / f"gsm8k/{split}.jsonl", g / "main" / f"{split}.jsonl")
    _readme(g, {"main": {"train": "main/train.jsonl", "test": "main/test.jsonl"}})
    h = root / "humaneval"
    (h / "openai_humaneval").mkdir(parents=True)
    shutil.copy(OFFLINE / "humaneval/HumanEval.jsonl.gz", h / "openai_humaneval/test.jsonl.gz")
    _readme(h, {"openai_humaneval": {"test": "openai_humaneval/test.jsonl.gz"}})
    c = root / "c4"
    sample = (OFFLINE / "c4-sample/c4-en-train.00000-of-01024.first1000.jsonl").read_bytes().splitlines(True)
    wiki = gzip.open(OFFLINE / "wikipedia-en/validation-00000-of-00001.jsonl.gz").read().splitlines(True)
    _gzip_lines(sample + wiki[:200], c / "en/c4-train.00000-of-01024.json.gz")
    _gzip_lines(wiki, c / "en/c4-validation.00000-of-00008.json.gz")
    _readme(c, {"en": {"train": "en/c4-train.*.json.gz", "validation": "en/c4-validation.*.json.gz"}})
    return {"gsm8k": g, "humaneval": h, "c4-sample": c, "c4-corpus": c}



@pytest.fixture
def from_hub(hub, tmp_path, monkeypatch):
    """Switch to the Hub path: no offline folder, the Hub allowed, each dataset's repository the local
    copy; token and datasets caches in tmp_path (so both paths really tokenise)."""
    def switch():
        monkeypatch.setenv("OASIS_DATA_DIR", str(tmp_path / "no-data"))
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
        for name, folder in hub.items():
            monkeypatch.setitem(sources.DATASETS, name, replace(sources.DATASETS[name], hub=str(folder)))
        sources._READ.clear()

    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    sources._READ.clear()
    return switch


def _equal(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_gsm8k_from_the_hub_gives_the_offline_batches(tok, from_hub):
    train, pairs = gsm8k.train_batches(tok, CFG), data.gsm8k_eval_pairs(tok, 20)
    offline = sources.used()
    from_hub()
    assert sources.source("gsm8k", "train") == "hub"
    assert _equal(gsm8k.train_batches(tok, CFG), train)
    assert data.gsm8k_eval_pairs(tok, 20) == pairs
    hub = sources.used()
    for split in ("train", "test"):
        assert offline[f"gsm8k/{split}"]["source"] == f"offline:gsm8k/{split}.jsonl"
        assert hub[f"gsm8k/{split}"]["source"].startswith("hub:")
        # the digest, computed here from the file's own lines
        lines = (OFFLINE / f"gsm8k/{split}.jsonl").read_text(encoding="utf-8").split("\n")[:-1]
        h = hashlib.sha256()
        for line in lines:
            row = json.loads(line)
            h.update(json.dumps([row["question"], row["answer"]], ensure_ascii=False).encode() + b"\n")
        assert offline[f"gsm8k/{split}"]["sha256"] == hub[f"gsm8k/{split}"]["sha256"] == h.hexdigest()
        assert hub[f"gsm8k/{split}"]["rows"] == len(lines)


def test_humaneval_from_the_hub_gives_the_offline_problems_and_batches(tok, from_hub):
    def batches():
        problems = data.humaneval_problems(None)
        pairs = [data.encode_code(tok, "plain", p["prompt"], p["canonical_solution"]) for p in problems]
        return problems, [data.supervised_batch(pairs[i:i + 8], tok) for i in range(0, len(pairs), 8)]

    problems, offline = batches()
    from_hub()
    hub_problems, hub = batches()
    assert hub_problems == problems and len(problems) == 164
    assert _equal(hub, offline)


def test_c4_from_the_hub(tok, from_hub):
    """The C4 sample read from allenai/c4's first en train shard equals the offline sample's batches; the
    validation path is the offline one on the same documents; training packs the en train stream after the
    sample, in order (expected: packed here by hand), in blocks shuffled by the seed."""
    held = {corpus: data.heldout_batches(corpus, tok, n_tokens=512, batch=2, seq_len=128)
            for corpus in ("c4", "wikipedia")}
    from_hub()
    assert sources.source("c4-corpus", "train") == "hub"
    for corpus in held:
        assert _equal(data.heldout_batches(corpus, tok, n_tokens=512, batch=2, seq_len=128), held[corpus])
    got = c4.train_batches(tok, {**CFG, "seq_len": 64})
    validation = OFFLINE / "wikipedia-en/validation-00000-of-00001.jsonl.gz"
    wiki = [json.loads(line) for line in gzip.open(validation)]
    stream = []
    for doc in wiki[:200]:
        stream += [tok.bos_token_id, *tok(doc["text"], add_special_tokens=False).input_ids, tok.eos_token_id]
        if len(stream) >= 3 * 2 * 64:
            break
    blocks = torch.tensor(stream[: 3 * 2 * 64]).view(6, 64)
    blocks = blocks[torch.randperm(6, generator=torch.Generator().manual_seed(CFG["seed"]))]
    assert torch.equal(torch.cat([b["input_ids"] for b in got]), blocks)
    read = sources.used()
    assert read["c4-sample/train"]["rows"] > 0 and read["c4-corpus/train"]["source"].startswith("hub:")


def test_neither_source_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OASIS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = run.main(["gsm8k", "--profile", "smoke", "--methods", "adam", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "OASIS_DATA_DIR" in err and "HF_DATASETS_OFFLINE=0" in err and "openai/gsm8k" in err
    assert not (tmp_path / "out").exists()


def test_lm_eval_reads_the_hub_rows(from_hub, tmp_path):
    """From the Hub, lm-eval's task yaml is pointed at a folder holding the rows the run was given."""
    from_hub()
    folder = Path(gsm8k._lm_eval_data(tmp_path / "scratch"))
    for split in ("train", "test"):
        offline = (OFFLINE / f"gsm8k/{split}.jsonl").read_text(encoding="utf-8").split("\n")
        written = (folder / f"{split}.jsonl").read_text(encoding="utf-8").split("\n")
        assert [json.loads(x) for x in written if x] == [json.loads(x) for x in offline if x]
