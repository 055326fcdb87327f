"""Models by name or path, their tokenizers and prompt formats, the project's BPE vocabulary and the
LLM-shaped CPU presets. Real pieces throughout: the offline SmolLM2 GGUF (converted once into .cache/,
which is the slow part of this file the first time), real transformers models saved to folders, the
real `tokenizers` trainer on real Wikipedia documents."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from suites import run as cli
from suites.core import profiles
from suites.train import data, models, sources, tokenizers

ROOT = Path(__file__).resolve().parent.parent
SMOL = "smollm2-135m"
RUN = {"base": "random", "device": "cpu", "dtype": "float32", "seed": 0, "base_seed": 0}


def same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def cfg_for(model: str, **kw) -> dict:
    return {**RUN, "model": model, **kw}


# ------------------------------------------------------------------------------------------- loading


def test_preset_is_a_random_init_read_with_the_project_tokenizer():
    cfg = cfg_for("llama-tiny")
    model = models.load_model(cfg)
    reference = models.build_model("llama-tiny", seed=0)
    assert same_weights(model, reference)
    fields = models.run_fields(cfg)
    assert fields == {"model_source": {"kind": "preset", "spec": "llama-tiny"},
                      "tokenizer": "mistral-v1-sp32k", "prompt_format": "plain"}
    assert tokenizers.tokenizer_id(models.load_tokenizer(cfg)) == "mistral-v1-sp32k"


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    model = models.build_model("llama-tiny", seed=3)
    model.save_pretrained(folder)
    return folder, model


def test_local_folder_loads_its_weights_and_falls_back_to_the_project_tokenizer(saved_tiny):
    folder, reference = saved_tiny
    cfg = cfg_for(str(folder))
    fields = models.run_fields(cfg)
    assert fields["model_source"] == {"kind": "local", "spec": str(folder)} and fields["base"] == "pretrained"
    # a folder without tokenizer files, vocabulary 32000: the project tokenizer of that vocabulary
    assert fields["tokenizer"] == "mistral-v1-sp32k" and fields["prompt_format"] == "plain"
    model = models.load_model({**cfg, **fields})
    assert same_weights(model, reference)


def test_local_folder_with_its_own_tokenizer_uses_it(saved_tiny, tmp_path):
    folder, _ = saved_tiny
    copy = tmp_path / "with-tokenizer"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    tokenizers.load_tokenizer().save_pretrained(copy)
    fields = models.run_fields(cfg_for(str(copy)))
    assert fields["tokenizer"] == "local:with-tokenizer"


@pytest.fixture(scope="module")
def smol():
    """SmolLM2 through its preset name: converted from the GGUF once, then read from .cache/models/."""
    cfg = cfg_for(SMOL)
    fields = models.run_fields(cfg)
    return {**cfg, **fields}


@pytest.mark.slow  # dequantizes SmolLM2 the first time (about a minute), then seconds
def test_gguf_is_converted_once_into_a_cache_named_by_its_digest_and_is_pretrained(smol):
    from suites.evaluate.tasks import gsm8k

    path = sources.data_dir() / models.WEIGHTS[SMOL]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert smol["model_source"] == {"kind": "gguf", "spec": SMOL, "file": path.name, "sha256": digest}
    cached = ROOT / ".cache" / "models" / f"{path.stem.lower()}-{digest[:12]}-c{models.CONVERSION}"
    assert (cached / "model.safetensors").is_file() and (cached / "tokenizer.json").is_file()
    assert json.loads((cached / "SOURCE.json").read_text())["sha256"] == digest
    assert "quantization_config" not in json.loads((cached / "config.json").read_text())
    model = models.load_model(smol)
    # the published shape (SOURCE.md): 30 layers, hidden 576, 9/3 heads, vocabulary 49,152, tied, 134.5M
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size) == (30, 576, 1536, 9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert smol["base"] == "pretrained" and smol["prompt_format"] == "chat"
    # the same file by path is the same model (and the same cache)
    assert models.run_fields(cfg_for(str(path)))["model_source"]["sha256"] == digest
    tok = models.load_tokenizer(smol)
    # the chat turn's end is the GGUF's own eos token (read here with the gguf package itself), special to the
    # tokenizer: transformers 5.17 converted it as <|im_start|>, and every answer span then failed
    import gguf

    field = gguf.GGUFReader(path).fields["tokenizer.ggml.eos_token_id"]
    eos = int(field.parts[field.data[0]][0])
    assert tok.eos_token_id == eos == c.eos_token_id and eos in tok.all_special_ids
    assert tok.convert_ids_to_tokens(eos) == "<|im_end|>"
    # pretrained: its answer NLL on a GSM8K test problem is far below a random model's (ln 49152 = 10.8)
    nll = gsm8k.before_training(model, tok, {**smol, "eval_limit": 1, "eval_batch": 1, "max_gen_toks": 256},
                                "cpu")["answer_nll"]
    assert nll < 3.0


def test_missing_gguf_file_is_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["gsm8k", "--profile", "smoke", "--methods", "adam", "--out", str(out),
                     "--set", f"model={tmp_path / 'nope.gguf'}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no such GGUF file" in err, err
    assert not out.exists()


def test_named_model_missing_from_the_data_folder_names_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("OASIS_DATA_DIR", str(tmp_path))
    with pytest.raises(models.ModelUnavailable, match=str(tmp_path / "models")):
        models.resolve(SMOL)


def test_missing_gguf_package_is_one_clear_line(tmp_path, monkeypatch):
    fake = tmp_path / "tiny.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "_cache_root", lambda: tmp_path / "cache")
    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda n: None if n == "gguf" else real(n))
    with pytest.raises(models.ModelUnavailable) as exc:
        models.model_config(str(fake))
    assert str(exc.value) == "reading the GGUF file tiny.gguf needs the gguf package: pip install gguf"
    assert not (tmp_path / "cache").exists()


def test_hub_id_not_available_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelUnavailable) as exc:
        models.model_config("no-such-org/no-such-model")
    assert "not available" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("spec, needle", [("llama-9z", "unknown model"), ("./nowhere", "no such file")])
def test_bad_names_are_one_line(spec, needle):
    with pytest.raises(models.ModelUnavailable, match=needle):
        models.resolve(spec)


def test_smoke_profile_shrinks_for_a_pretrained_model_unless_told_otherwise():
    prof = profiles.profile("gsm8k", "smoke")
    small = profiles.apply_overrides(prof, [("model", SMOL)], {})
    assert (small["steps"], small["mem_window"], small["seq_len"]) == (2, 1, 160)
    kept = profiles.apply_overrides(prof, [("model", SMOL), ("steps", "3")], {})
    assert kept["steps"] == 3 and kept["seq_len"] == 160
    tiny = profiles.apply_overrides(prof, [], {})
    assert (tiny["steps"], tiny["seq_len"]) == (prof["steps"], prof["seq_len"])


# ------------------------------------------------------------------------------------------- prompts


def test_chat_supervision_marks_exactly_the_assistant_answer(smol):
    """Labels cover the assistant text and its end-of-turn token, nothing else; checked against the
    `tokenizers` library reading tokenizer.json on its own, with character offsets into the rendered chat."""
    from tokenizers import Tokenizer

    tok = models.load_tokenizer(smol)
    ex = data.gsm8k_examples("train")[0]
    batch = data.supervised_batch([data.encode_pair(tok, "chat", ex["question"], ex["answer"])], tok)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    rendered = tok.apply_chat_template([{"role": "user", "content": ex["question"]},
                                        {"role": "assistant", "content": ex["answer"]}], tokenize=False)
    start = rendered.index(ex["answer"], rendered.index("<|im_start|>assistant"))
    end = rendered.index("<|im_end|>", start) + len("<|im_end|>")
    cached = models.weights_dir(models.resolve(SMOL))
    enc = Tokenizer.from_file(str(Path(cached) / "tokenizer.json")).encode(rendered, add_special_tokens=False)
    n = int(batch["attention_mask"][0].sum())
    assert ids[:n].tolist() == enc.ids[:n]  # the rendered chat, up to the end-of-turn token
    expected = [i for i, (a, b) in enumerate(enc.offsets[:n]) if a >= start and b <= end]
    assert (labels != data.IGNORE).nonzero().flatten().tolist() == expected
    assert enc.ids[expected[-1]] == tok.convert_tokens_to_ids("<|im_end|>")
    assert labels[expected].tolist() == [enc.ids[i] for i in expected]


def test_plain_format_supervises_the_answer_after_the_lm_eval_prompt():
    tok = tokenizers.load_tokenizer()
    p, a = data.encode_pair(tok, "plain", "What is 2+3?", "5\n#### 5")
    assert tok.decode(p, skip_special_tokens=True) == "Question: What is 2+3?\nAnswer:"
    assert a[-1] == tok.eos_token_id and tok.decode(a, skip_special_tokens=True).strip() == "5\n#### 5"


# ------------------------------------------------------------------------------------------- BPE


TRAIN_SNIPPET = """
import sys
from suites.train import sources, tokenizers
rows = sources.read_jsonl(sources.require("wikipedia-en/train-00000-of-00010.jsonl.gz"))
texts = [d["text"] for d in rows][:40]
sys.stdout.write(tokenizers.train_wiki_bpe(texts, 600).to_str())
"""


def test_bpe_training_is_deterministic_across_processes():
    """Same documents, same order: byte-identical vocabulary in two processes with different hash seeds."""
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "TOKENIZERS_PARALLELISM": "true"}
        proc = subprocess.run([sys.executable, "-c", TRAIN_SNIPPET], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout)
    assert outs[0] == outs[1] and len(json.loads(outs[0])["model"]["vocab"]) == 600


def test_bpe_cache_is_keyed_by_what_determines_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CACHE_DIR", tmp_path)
    shard = "train-00000-of-00010.jsonl.gz"
    tok = tokenizers.wiki_bpe(vocab=500, shard=shard, docs=20)
    again = tokenizers.wiki_bpe(vocab=500, shard=shard, docs=20)
    other = tokenizers.wiki_bpe(vocab=500, shard=shard, docs=21)
    assert tok.oasis_id == again.oasis_id != other.oasis_id
    assert len(list((tmp_path / "tokenizers").iterdir())) == 2
    key = json.loads((tmp_path / "tokenizers" / tok.oasis_id / "key.json").read_text())
    shard_bytes = (sources.data_dir() / "wikipedia-en" / shard).read_bytes()
    assert key["shard_sha256"] == hashlib.sha256(shard_bytes).hexdigest() and key["vocab"] == 500
    # special tokens sit where the Llama configs expect them, and BOS is prepended like LLaMA's
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2]
    ids = tok("Paris is big.").input_ids
    assert ids[0] == 1 and tok.decode(ids[1:]) == "Paris is big."


# ------------------------------------------------------------------------------------------- presets


def _embedding_share(model) -> float:
    """Parameters of the token embedding and the lm_head (a tied pair counted once) over all parameters,
    from the storage of the built model."""
    seen, embed, total = set(), 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel()
        if "embed_tokens" in name or "lm_head" in name:
            embed += p.numel()
    return embed / total


def test_cpu_profiles_use_presets_shaped_like_an_llm():
    names = {profiles.PROFILES[s]["cpu"]["model"] for s in ("c4", "gsm8k", "humaneval")}
    assert names == {"llama-cpu"}
    for name in names:
        model = models.build_model(name)
        share = _embedding_share(model)
        assert share <= 0.25, (name, share)
        assert models.parameter_counts(model.config)["total"] == sum(p.numel() for p in model.parameters())
        # the vocabulary is the project BPE's (trained on first use, not here: the check reads its settings)
        assert model.config.vocab_size == tokenizers.PROJECT_BPE[models.PRESETS[name].tokenizer]["vocab"]


def test_code_pairs_supervise_the_function_body_only():
    """HumanEval-shaped training pairs from the standard library: the prompt is the `def` line through the
    docstring, the loss is on the body (and EOS) only; checked against `ast` on the same file."""
    import ast

    tok = tokenizers.load_tokenizer()
    path = next(p for p in data.stdlib_sources() if p.name == "stat.py")
    pairs = data.function_pairs(path)
    tree = ast.parse(path.read_text())
    documented = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.decorator_list
                  and ast.get_docstring(n) is not None and len(n.body) > 1]
    assert [p.split("(")[0].removeprefix("def ") for p, _ in pairs] == documented
    prompt, body = pairs[0]
    assert prompt.startswith("def S_IMODE(mode):") and prompt.rstrip().endswith('"""')
    assert body == "    return mode & 0o7777\n"
    p, a = data.encode_code(tok, "plain", prompt, body)
    batch = data.supervised_batch([(p, a)], tok)
    supervised = batch["labels"][0] != data.IGNORE
    assert int(supervised.sum()) == len(a) and int(supervised.nonzero()[0]) == len(p)
    assert tok.decode(batch["input_ids"][0][supervised], skip_special_tokens=True).strip() == body.strip()
