"""Data: deterministic batches (where data lives: `suites.train.sources`; tokenizers:
`suites.train.tokenizers`).

Data are read from `OASIS_DATA_DIR` (default `<repo>/../shared/data`) and never copied into the
repository; a dataset that is not there is read from the Hugging Face Hub when that is allowed
(`suites.train.sources`, which also notes what each run read for its record). Every batch list is a pure
function of (data, tokenizer, seed, sizes), so every method of a profile sees the same data in the same
order. Tokenised streams are cached under `.cache/tokens/`
(gitignored) because each run is its own process and would otherwise tokenise the same text again.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import random
import sysconfig
from pathlib import Path

import torch

from suites.core import files
from suites.train import sources
from suites.train.tokenizers import tokenizer_id

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)


TOKEN_CACHE_FORMAT = 2


def _cached_tokens(key: dict, make, read_as: str) -> torch.Tensor:
    """A 1-D int32 token tensor cached under .cache/tokens/<digest of key>.pt with the provenance of the
    documents it was packed from (`make() -> (tokens, provenance)`), noted in `sources.used` as `read_as`."""
    key = {**key, "format": TOKEN_CACHE_FORMAT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = sources.CACHE_DIR / "tokens" / f"{digest}.pt"
    if path.exists():
        saved = torch.load(path)
    else:
        tokens, read = make()
        saved = {"tokens": tokens, "read": read}
        buffer = io.BytesIO()
        torch.save(saved, buffer)
        files.atomic_write(path, buffer.getvalue())
    sources.note(read_as, saved["read"])
    return saved["tokens"]


def _packed(documents, fields_source: str, tokenizer, n_tokens: int, fields=("text",)):
    """(the first `n_tokens` tokens of `documents` packed, the provenance of the documents packed)."""
    digest = sources.RowDigest(fields)
    tokens = _pack(sources.texts(documents, digest), tokenizer, n_tokens)
    return tokens, {"source": fields_source, "rows": digest.rows, "sha256": digest.hexdigest()}


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
    """`steps` packed batches of the c4 suite's training corpus: the Wikipedia train shards offline,
    documents in a seeded order; from the Hub, C4 en train in stream order (`suites.train.sources`). The
    packed blocks are shuffled by the seed either way."""
    n_tokens = steps * batch * seq_len
    if sources.source("c4-corpus", "train") == "hub":
        where = sources.DATASETS["c4-corpus"].describe("train")
        key = {"corpus": "c4-corpus/train", "source": where, "n": n_tokens, "tok": tokenizer_id(tokenizer)}
        tokens = _cached_tokens(key, lambda: _packed(sources.hub_rows("c4-corpus", "train"), where, tokenizer,
                                                     n_tokens), "c4-corpus/train")
        return _blocks_to_batches(tokens, batch, seq_len, steps, seed)
    shards = sorted(sources.require("wikipedia-en").glob("train-*.jsonl.gz"))
    if not shards:
        raise sources.DataMissing(
            f"missing data: expected train-*.jsonl.gz under {sources.data_dir() / 'wikipedia-en'}")

    def docs():
        rng = random.Random(seed)
        order = list(shards)
        rng.shuffle(order)
        for shard in order:
            documents = [{"text": d["text"]} for d in sources.read_jsonl(shard)]
            rng.shuffle(documents)
            yield from documents

    key = {
        "corpus": "wikipedia-train",
        "shards": [s.name for s in shards],
        "seed": seed,
        "n": n_tokens,
        "tok": tokenizer_id(tokenizer),
    }
    tokens = _cached_tokens(key, lambda: _packed(docs(), "offline:wikipedia-en/train-*.jsonl.gz", tokenizer,
                                                 n_tokens), "c4-corpus/train")
    return _blocks_to_batches(tokens, batch, seq_len, steps, seed)


# held-out corpus -> (dataset, split) of suites.train.sources
HELDOUT = {"wikipedia": ("c4-corpus", "validation"), "c4": ("c4-sample", "train")}


def heldout_batches(corpus: str, tokenizer, *, n_tokens: int, batch: int, seq_len: int) -> list[dict]:
    """The first `n_tokens` tokens of a held-out corpus in file order: "wikipedia" (the c4 suite's
    validation corpus: Wikipedia offline, C4 en validation from the Hub) or "c4" (the C4 sample)."""
    name, split = HELDOUT[corpus]
    n_blocks = max(1, n_tokens // seq_len)
    key = {"corpus": corpus, "n": n_blocks * seq_len, "tok": tokenizer_id(tokenizer)}
    if sources.source(name, split) == "offline":
        path = sources.offline_path(name, split)
        key["file"] = path.name
        where = f"offline:{sources.DATASETS[name].offline[split]}"
        documents = lambda: sources.read_jsonl(path)  # noqa: E731
    else:
        where = sources.DATASETS[name].describe(split)
        key["source"] = where
        documents = lambda: sources.hub_rows(name, split)  # noqa: E731
    tokens = _cached_tokens(
        key, lambda: _packed(documents(), where, tokenizer, n_blocks * seq_len), f"{name}/{split}")
    blocks = tokens.view(n_blocks, seq_len).long()
    return [
        {"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()}
        for b in blocks.split(batch)
    ]


# ---------------------------------------------------------------- prompt formats

# How a (question, answer) pair is laid out for a model, answer-only supervision in both:
#   plain  "Question: {q}\nAnswer: {a}</s>" (lm-eval's gsm8k prompt; base models and the project's own)
#   chat   the model's own chat template: the user turn is the question, the assistant turn the answer,
#          closed by the template's end-of-turn token (instruct models, e.g. SmolLM2-135M-Instruct)
PROMPT_FORMATS = ("plain", "chat")


def prompt_format_of(tokenizer) -> str:
    """`chat` when the tokenizer carries a chat template (an instruct model), else `plain`."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def chat_prompt(tokenizer, user: str) -> str:
    """The rendered chat up to the start of the assistant's answer (what generation continues from)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


def chat_end_of_turn(tokenizer, user: str = "1+1?", answer: str = "2") -> str:
    """The text the chat template puts right after an assistant answer, up to the end-of-turn marker
    (`<|im_end|>` for ChatML), read off the template itself (once per tokenizer)."""
    cached = getattr(tokenizer, "oasis_end_of_turn", None)
    if cached is None:
        cached = tokenizer.oasis_end_of_turn = _end_of_turn(tokenizer, user, answer)
    return cached


def _end_of_turn(tokenizer, user: str, answer: str) -> str:
    prompt = chat_prompt(tokenizer, user)
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(prompt + answer):
        raise ValueError("the chat template does not render an answer as prompt + answer; "
                         "answer-only supervision cannot be placed")
    end = full[len(prompt) + len(answer):].rstrip()
    if not end:
        raise ValueError("the chat template puts no end-of-turn marker after an answer")
    return end


def encode_pair(tokenizer, fmt: str, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, answer_ids) of one example in format `fmt`; the loss goes on answer_ids only.

    In the chat format the answer ids are the assistant text plus the end-of-turn marker, and they are
    checked to be exactly the tail of the tokenised whole conversation (so the labels mark the tokens
    the model really sees, not a re-tokenisation that merges across the boundary)."""
    if fmt == "plain":
        p = tokenizer(gsm8k_prompt(question)).input_ids  # with BOS where the tokenizer adds one
        a = tokenizer(" " + answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return p, a
    if fmt == "chat":
        prompt = chat_prompt(tokenizer, question)
        end = chat_end_of_turn(tokenizer)
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + tokenizer(
            end, add_special_tokens=False).input_ids
        whole = tokenizer(prompt + answer + end, add_special_tokens=False).input_ids
        if whole != p + a:
            raise ValueError("chat format: prompt and answer tokens merge across their boundary")
        return p, a
    raise ValueError(f"unknown prompt format {fmt!r}; choose from {', '.join(PROMPT_FORMATS)}")


# ---------------------------------------------------------------- GSM8K (fine-tuning)


def gsm8k_prompt(question: str) -> str:
    """The prompt of lm-eval's `gsm8k` task (doc_to_text), so training and evaluation agree."""
    return f"Question: {question}\nAnswer:"


def gsm8k_examples(split: str) -> list[dict]:
    """GSM8K's `split` ("train" or "test") in its order, from the offline copy or `openai/gsm8k` (main)."""
    return sources.rows("gsm8k", split)


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


def gsm8k_train_batches(tokenizer, *, steps: int, batch: int, seq_len: int, seed: int,
                        fmt: str = "plain") -> list[dict]:
    """`steps` batches of GSM8K train problems in a seeded order, in prompt format `fmt`; problems longer
    than seq_len are skipped."""
    examples = gsm8k_examples("train")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    pairs = []
    for i in order:
        p, a = encode_pair(tokenizer, fmt, examples[i]["question"], examples[i]["answer"])
        if len(p) + len(a) <= seq_len:
            pairs.append((p, a))
        if len(pairs) == steps * batch:
            break
    if not pairs:
        raise ValueError(f"no GSM8K training problem fits in seq_len={seq_len} tokens")
    if len(pairs) < steps * batch:  # more steps than problems: another epoch in the same order
        pairs = (pairs * (steps * batch // max(1, len(pairs)) + 1))[: steps * batch]
    return [supervised_batch(pairs[i : i + batch], tokenizer, seq_len) for i in range(0, len(pairs), batch)]


def gsm8k_eval_pairs(tokenizer, limit: int | None, fmt: str = "plain") -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, answer_ids) of the first `limit` test problems, in lm-eval's order."""
    return [encode_pair(tokenizer, fmt, ex["question"], ex["answer"])
            for ex in gsm8k_examples("test")[: limit or None]]


# ---------------------------------------------------------------- code (HumanEval fine-tuning)


def stdlib_sources() -> list[Path]:
    """The running interpreter's own standard-library Python sources (an offline code corpus), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]  # never descend into installed packages
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(files)


def function_pairs(path: Path) -> list[tuple[str, str]]:
    """(prompt, body) of every undecorated top-level function with a docstring in one source file, shaped
    like a HumanEval problem: the prompt is the `def` line through the docstring, the body the rest."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    pairs = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.decorator_list:
            continue
        if ast.get_docstring(node) is None or len(node.body) < 2:
            continue
        doc_end = node.body[0].end_lineno
        prompt, body = "".join(lines[node.lineno - 1 : doc_end]), "".join(lines[doc_end : node.end_lineno])
        if body.strip():
            pairs.append((prompt, body if body.endswith("\n") else body + "\n"))
    return pairs


CODE_INSTRUCTION = "Complete the following Python function.\n\n"
CODE_FENCE = "```python\n"


def encode_code(tokenizer, fmt: str, prompt: str, body: str) -> tuple[list[int], list[int]]:
    """(prompt_ids, body_ids) of a function completion in format `fmt`; the loss goes on the body only.

    plain: the code itself (HumanEval's own prompt), the body, EOS.
    chat:  the user turn asks to complete the function shown in a fenced block; the assistant turn starts
           with the fence and the prompt code (given, not supervised), then the body, the closing fence and
           the end-of-turn marker (supervised). Generation continues from the same point."""
    if fmt == "plain":
        p = tokenizer(prompt).input_ids
        a = tokenizer(body, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        return p, a
    if fmt == "chat":
        # the cut sits before the prompt's last newline: a newline and the body's indentation are one
        # pre-token for byte-level BPE, so a cut after it would split a token the model never sees split
        context = code_chat_prompt(tokenizer, prompt)
        answer = prompt[len(prompt.rstrip("\n")):] + body + "```"
        end = chat_end_of_turn(tokenizer)
        p = tokenizer(context, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + tokenizer(
            end, add_special_tokens=False).input_ids
        if tokenizer(context + answer + end, add_special_tokens=False).input_ids != p + a:
            raise ValueError("chat format: prompt and answer tokens merge across their boundary")
        return p, a
    raise ValueError(f"unknown prompt format {fmt!r}; choose from {', '.join(PROMPT_FORMATS)}")


def code_chat_prompt(tokenizer, prompt: str) -> str:
    """The rendered chat that a function body continues in the chat format (see `encode_code`): up to the
    prompt code without its final newline, which the completion starts with."""
    user = f"{CODE_INSTRUCTION}{CODE_FENCE}{prompt}```"
    return chat_prompt(tokenizer, user) + CODE_FENCE + prompt.rstrip("\n")


def code_train_batches(tokenizer, *, steps: int, batch: int, seq_len: int, seed: int,
                       fmt: str = "plain") -> list[dict]:
    """`steps` batches of function completions from the standard library (files in a seeded order),
    loss on the bodies only; functions longer than seq_len are skipped."""
    files = stdlib_sources()
    if not files:
        raise sources.DataMissing(f"missing data: no Python sources under {sysconfig.get_paths()['stdlib']}")
    order = list(files)
    random.Random(seed).shuffle(order)
    pairs, digest = [], sources.RowDigest(("prompt", "body"))
    for path in order:
        for prompt, body in function_pairs(path):
            p, a = encode_code(tokenizer, fmt, prompt, body)
            if len(p) + len(a) <= seq_len:
                pairs.append((p, a))
                digest.add({"prompt": prompt, "body": body})
            if len(pairs) == steps * batch:
                break
        if len(pairs) == steps * batch:
            break
    if not pairs:
        raise ValueError(f"no standard-library function fits in seq_len={seq_len} tokens")
    sources.note("code/train", {"source": f"stdlib:{sysconfig.get_paths()['stdlib']}", "rows": digest.rows,
                                "sha256": digest.hexdigest()})
    pairs = (pairs * (steps * batch // len(pairs) + 1))[: steps * batch]
    return [supervised_batch(pairs[i : i + batch], tokenizer, seq_len) for i in range(0, len(pairs), batch)]


def humaneval_problems(limit: int | None) -> list[dict]:
    """The first `limit` HumanEval problems (all when None), offline or from `openai/openai_humaneval`."""
    return sources.rows("humaneval", "test")[: limit or None]
