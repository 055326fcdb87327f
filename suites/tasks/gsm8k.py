"""GSM8K fine-tuning: loss on the answer tokens only; scored by lm-eval and answer NLL.

Accuracy is lm-eval's own `gsm8k` definition (exact match on the final number after the "#### "
regex; the flexible-extract filter is reported too), run offline through `gsm8k_local.yaml`, whose
dataset points at the local jsonl copy. `answer_nll` is the token-weighted NLL of the reference
answers given the prompt, on the same test problems.

Prompt format (`cfg["prompt_format"]`, from `suites.models.run_fields`): `plain` trains and evaluates on
"Question: ...\nAnswer: ..."; `chat` (instruct models) puts the question in the user turn and the
solution in the assistant turn of the model's own chat template, and lm-eval renders its prompts with
the same template (`apply_chat_template=True`, task `gsm8k_local_chat`: the user turn is the question).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path

from suites import data
from suites.tasks._eval import mean_nll, ppl

FINETUNE = True
HEADLINE = "accuracy"
TASK_YAML = Path(__file__).with_name("gsm8k_local.yaml")
CHAT_TASK_YAML = Path(__file__).with_name("gsm8k_local_chat.yaml")
TASK_NAMES = {"plain": "gsm8k_local", "chat": "gsm8k_local_chat"}


def check_data() -> None:
    data.require("gsm8k/train.jsonl")
    data.require("gsm8k/test.jsonl")


def train_batches(tokenizer, cfg: dict) -> list[dict]:
    return data.gsm8k_train_batches(
        tokenizer, steps=cfg["steps"], batch=cfg["batch"], seq_len=cfg["seq_len"], seed=cfg["seed"],
        fmt=prompt_format(cfg),
    )


def prompt_format(cfg: dict) -> str:
    return cfg.get("prompt_format", "plain")


def answer_nll(model, tokenizer, cfg: dict, device: str) -> float:
    pairs = data.gsm8k_eval_pairs(tokenizer, cfg["eval_limit"], prompt_format(cfg))
    batches = [
        data.supervised_batch(pairs[i : i + cfg["eval_batch"]], tokenizer)
        for i in range(0, len(pairs), cfg["eval_batch"])
    ]
    return mean_nll(model, batches, device)


def lm_eval_accuracy(model, tokenizer, cfg: dict, device: str) -> dict:
    """Run lm-eval's gsm8k definition on the first `eval_limit` test problems (all when None)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets  # lm-eval's own dependency

    datasets.disable_progress_bars()
    gsm8k_dir = str(data.require("gsm8k").resolve())
    model.eval()
    with tempfile.TemporaryDirectory(prefix="oasis-lm-eval-") as include:
        for yaml in (TASK_YAML, CHAT_TASK_YAML):
            Path(include, yaml.name).write_text(yaml.read_text().replace("@GSM8K_DIR@",
                                                                         json.dumps(gsm8k_dir)[1:-1]))
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=cfg["eval_batch"],
            device=device,
            max_length=int(getattr(model.config, "max_position_embeddings", 2048)),
        )
        # lm-eval and datasets draw their own progress bars; the run's bar is enough on a terminal
        quiet = os.environ.get("OASIS_DEBUG") is None
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            out = _simple_evaluate(lm_eval, lm, include, cfg)
    model.train()
    task = TASK_NAMES[prompt_format(cfg)]
    res = out["results"][task]
    n = out.get("n-samples", {}).get(task, {}).get("effective")
    return {
        "accuracy": float(res["exact_match,strict-match"]),
        "accuracy_flexible": float(res["exact_match,flexible-extract"]),
        "eval_problems": int(n) if n is not None else None,
    }


def _simple_evaluate(lm_eval, lm, include: str, cfg: dict) -> dict:
    from lm_eval.tasks import TaskManager

    chat = prompt_format(cfg) == "chat"
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[TASK_NAMES[prompt_format(cfg)]],
        apply_chat_template=chat,  # the model's own template, no system instruction added (as in training)
        task_manager=TaskManager(include_path=include, include_defaults=False),
        limit=cfg["eval_limit"],
        gen_kwargs={"max_gen_toks": cfg["max_gen_toks"]},
        log_samples=False,
        bootstrap_iters=0,
        random_seed=cfg["seed"],
        numpy_random_seed=cfg["seed"],
        torch_random_seed=cfg["seed"],
        fewshot_random_seed=cfg["seed"],
        verbosity="ERROR",
    )


def before_training(model, tokenizer, cfg: dict, device: str) -> dict:
    """The answer NLL of the model a run starts from, with the evaluation's own function and problems
    (recorded as `metrics.step0`, so every record shows what training changed)."""
    nll = answer_nll(model, tokenizer, cfg, device)
    return {"answer_nll": nll, "answer_ppl": ppl(nll)}


def evaluate(model, tokenizer, cfg: dict, device: str) -> dict:
    metrics = lm_eval_accuracy(model, tokenizer, cfg, device)
    nll = answer_nll(model, tokenizer, cfg, device)
    metrics.update(answer_nll=nll, answer_ppl=ppl(nll))
    return metrics
