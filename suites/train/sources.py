"""Where a suite's rows come from: the offline folder when it holds them, else the Hugging Face Hub.

Every dataset names its offline files (under `OASIS_DATA_DIR`, default `<repo>/../shared/data`) and the Hub
dataset lm-eval reads (`openai/gsm8k` main, `openai/openai_humaneval`, `allenai/c4` en). The offline copy is
the default wherever it exists; without it the rows are read with `datasets.load_dataset` when the Hub is
allowed (HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset or 0); with neither, one line names both ways to get
them. The same rows give the same batches from either source (tests/test_data_sources.py serves the offline
files as a Hub-style dataset through `datasets` and compares the batches bit for bit).

The c4 suite trains and validates on Wikipedia offline (there is no C4 training corpus here): its Hub path
reads C4 itself, `allenai/c4` en train in stream order after its first 1,000 documents (which are the C4
sample the suite scores, kept out of training) and `allenai/c4` en validation, streamed, never downloaded
whole. A record's `metrics.data` names the source of every split the run read, with the number of rows and
a sha256 over the fields the suite reads (`digest`), equal for equal rows whatever the source.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from suites.core.records import REPO_ROOT

CACHE_DIR = REPO_ROOT / ".cache"  # gitignored: tokenised streams, tokenizers, converted models, bases


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


@dataclass(frozen=True)
class HubSplit:
    """How one split is read from the Hub: `split` of `config`, or of `data_files`; `skip`/`take` rows."""

    split: str
    data_files: str | None = None
    skip: int = 0
    take: int | None = None
    streaming: bool = False


@dataclass(frozen=True)
class Dataset:
    name: str
    hub: str  # the Hub repository (a local folder in tests)
    config: str | None
    fields: tuple[str, ...]  # what the suite reads of a row (and the digest covers)
    offline: dict[str, str]  # split -> a file or folder under data_dir()
    splits: dict[str, HubSplit] = field(default_factory=dict)

    def describe(self, split: str) -> str:
        where = self.splits[split]
        extra = f", {where.data_files}" if where.data_files else ""
        rows = f", rows {where.skip}..{where.skip + where.take}" if where.take else (
            f", from row {where.skip}" if where.skip else "")
        return f"hub:{self.hub} ({self.config or 'default'}{extra}) {where.split}{rows}"


C4_SAMPLE_ROWS = 1000  # the offline C4 sample: the first 1,000 documents of en train shard 00000
DATASETS = {
    "gsm8k": Dataset("gsm8k", "openai/gsm8k", "main", ("question", "answer"),
                     {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
                     {"train": HubSplit("train"), "test": HubSplit("test")}),
    "humaneval": Dataset("humaneval", "openai/openai_humaneval", "openai_humaneval",
                         ("task_id", "prompt", "canonical_solution", "test", "entry_point"),
                         {"test": "humaneval/HumanEval.jsonl.gz"}, {"test": HubSplit("test")}),
    "c4-sample": Dataset("c4-sample", "allenai/c4", None, ("text",),
                         {"train": "c4-sample/c4-en-train.00000-of-01024.first1000.jsonl"},
                         {"train": HubSplit("train", data_files="en/c4-train.00000-of-01024.json.gz",
                                            take=C4_SAMPLE_ROWS, streaming=True)}),
    # the c4 suite's training and validation corpus: Wikipedia offline, C4 itself from the Hub
    "c4-corpus": Dataset("c4-corpus", "allenai/c4", "en", ("text",),
                         {"train": "wikipedia-en",
                          "validation": "wikipedia-en/validation-00000-of-00001.jsonl.gz"},
                         {"train": HubSplit("train", skip=C4_SAMPLE_ROWS, streaming=True),
                          "validation": HubSplit("validation", streaming=True)}),
}

# what this process read, split by split ("gsm8k/train" -> source, rows, digest): each run is one process
_READ: dict[str, dict] = {}


def hub_allowed() -> bool:
    """Whether the Hub may be used: neither offline switch of the Hugging Face libraries is on."""
    return not any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
                   for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def offline_path(name: str, split: str) -> Path:
    return data_dir() / DATASETS[name].offline[split]


def source(name: str, split: str) -> str:
    """`offline` when the offline copy of the split exists, else `hub` when the Hub is allowed; DataMissing
    (one line naming both ways to get the rows) otherwise. Reads nothing."""
    ds = DATASETS[name]
    path = offline_path(name, split)
    if path.exists():
        return "offline"
    if hub_allowed():
        return "hub"
    top = ds.offline[split].split("/")[0]
    raise DataMissing(
        f"missing data: {path} does not exist and the Hub is off; put the offline copy there (or set "
        f"OASIS_DATA_DIR to a folder holding {top}/), or allow the Hub (HF_HUB_OFFLINE=0 "
        f"HF_DATASETS_OFFLINE=0) to read {ds.describe(split).removeprefix('hub:')}")


def check(name: str, *splits: str) -> None:
    for split in splits or tuple(DATASETS[name].offline):
        source(name, split)


class RowDigest:
    """sha256 over the suite's fields of each row, in order (JSON, one line a row), and the row count."""

    def __init__(self, fields: tuple[str, ...]):
        self.fields, self.rows, self._h = fields, 0, hashlib.sha256()

    def add(self, row: dict) -> dict:
        self._h.update(json.dumps([row[f] for f in self.fields], ensure_ascii=False).encode() + b"\n")
        self.rows += 1
        return row

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def note(key: str, entry: dict) -> None:
    """Remember what was read (`used`); a split read twice keeps its latest entry."""
    _READ[key] = dict(entry)


def used() -> dict:
    """Every split this process read: {"gsm8k/train": {"source", "rows", "sha256"}, ...}."""
    return {k: dict(v) for k, v in sorted(_READ.items())}


def hub_rows(name: str, split: str) -> Iterator[dict]:
    """The split's rows from the Hub (or a Hub-style folder) through `datasets.load_dataset`."""
    import datasets

    ds, where = DATASETS[name], DATASETS[name].splits[split]
    kwargs = {"split": where.split, "streaming": where.streaming}
    if where.data_files:
        kwargs["data_files"] = where.data_files
    rows = datasets.load_dataset(ds.hub, ds.config, **kwargs)
    if where.skip:
        rows = rows.skip(where.skip)
    if where.take is not None:
        rows = rows.take(where.take)
    for row in rows:
        yield {f: row[f] for f in ds.fields}


def rows(name: str, split: str) -> list[dict]:
    """Every row of a small split (gsm8k, humaneval, the C4 sample), from its source, noted in `used`."""
    ds = DATASETS[name]
    digest = RowDigest(ds.fields)
    if source(name, split) == "offline":
        path = offline_path(name, split)
        out = [digest.add({f: r[f] for f in ds.fields}) for r in read_jsonl(path)]
        where = f"offline:{ds.offline[split]}"
    else:
        out = [digest.add(r) for r in hub_rows(name, split)]
        where = ds.describe(split)
    note(f"{name}/{split}", {"source": where, "rows": digest.rows, "sha256": digest.hexdigest()})
    return out


def texts(documents: Iterable[dict], digest: RowDigest) -> Iterator[str]:
    """The `text` of each document, each counted in `digest` as it is consumed."""
    for doc in documents:
        yield digest.add({f: doc[f] for f in digest.fields})["text"]
