"""GSM8K fine-tuning: loss on the answer tokens only; scored by lm-eval and answer NLL.

Accuracy is lm-eval's own `gsm8k` definition (exact match on the final number after the "#### "
regex; the flexible-extract filter is reported too), run offline through `gsm8k_local.yaml`, whose
dataset points at the local jsonl copy, with `max_gen_toks` new tokens. On the same test problems, from
the reference solutions (`answer_scores`): `answer_nll`, the teacher-forced `final_answer_acc_tf` and
`gen_ceiling`, the share of solutions that fit in the generation budget.

Prompt format (`cfg["prompt_format"]`, from `suites.train.models.run_fields`): `plain` trains and evaluates on
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

import torch

from suites.core import files
from suites.core.profiles import option
from suites.evaluate.tasks._eval import ppl, prompt_format, scored_batches
from suites.train import data, sources

FINETUNE = True
HEADLINE = "accuracy"
# the summary table: generated accuracy, and the teacher-forced scores that move at CPU scale
SUMMARY = ("accuracy", "final_answer_acc_tf", "answer_nll")
TASK_YAML = Path(__file__).with_name("gsm8k_local.yaml")
CHAT_TASK_YAML = Path(__file__).with_name("gsm8k_local_chat.yaml")
TASK_NAMES = {"plain": "gsm8k_local", "chat": "gsm8k_local_chat"}


def check_data() -> None:
    sources.check("gsm8k", "train", "test")


def train_batches(tokenizer, cfg: dict) -> list[dict]:
    return data.gsm8k_train_batches(
        tokenizer, steps=cfg["steps"], batch=cfg["batch"], seq_len=cfg["seq_len"], seed=cfg["seed"],
        fmt=prompt_format(cfg),
    )


def final_number_span(tokenizer, answer: str, answer_ids: list[int]) -> tuple[int, int]:
    """(start, end) of the tokens that spell a GSM8K solution's final number (the text after "#### ") in
    its answer tokens: the shortest run ending at the last non-special token whose text ends with it."""
    number = answer[answer.rindex("#### ") + len("#### "):].strip()
    special = set(tokenizer.all_special_ids)
    end = len(answer_ids)
    while end > 0 and answer_ids[end - 1] in special:
        end -= 1
    for start in range(end - 1, -1, -1):
        text = tokenizer.decode(answer_ids[start:end]).strip()
        if text.endswith(number) and len(text) >= len(number):
            return start, end
    raise ValueError(f"the answer tokens do not spell the final number {number!r}")


def answer_scores(model, tokenizer, cfg: dict, device: str) -> dict:
    """Teacher-forced scores of the reference solutions of the first `eval_limit` test problems, from one
    forward pass each:

    - `answer_nll` / `answer_ppl`: token-weighted NLL of the whole solution given the prompt;
    - `final_answer_acc_tf`: share of problems whose greedy (argmax) next-token predictions, given the
      prompt and the gold solution up to its final number, reproduce every token of that number;
      continuous enough to move at CPU scale, where generated accuracy sits at 0;
    - `gen_ceiling`: share of the solutions whose tokens up to the final number fit in `max_gen_toks`,
      the most that generated accuracy can reach with that budget.
    """
    fmt = prompt_format(cfg)
    examples = data.gsm8k_examples("test")[: cfg["eval_limit"] or None]
    pairs = [data.encode_pair(tokenizer, fmt, ex["question"], ex["answer"]) for ex in examples]
    spans = [final_number_span(tokenizer, ex["answer"], a) for ex, (_, a) in zip(examples, pairs)]
    size = cfg["eval_batch"]
    batches = [data.supervised_batch(pairs[i : i + size], tokenizer) for i in range(0, len(pairs), size)]
    total, count, correct = 0.0, 0, 0
    for b, (batch, logits) in enumerate(scored_batches(model, batches, device)):
        labels = batch["labels"].to(device)[:, 1:]
        total += float(torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=data.IGNORE,
            reduction="sum"))
        count += int((labels != data.IGNORE).sum())
        predicted = logits.argmax(-1)
        for row in range(logits.size(0)):
            prompt, answer = pairs[b * size + row]
            start, end = spans[b * size + row]
            # the token at position t is predicted by the logits at t - 1
            at = torch.arange(len(prompt) + start, len(prompt) + end, device=predicted.device)
            correct += bool((predicted[row, at - 1] == batch["input_ids"][row, at.cpu()].to(device)).all())
    nll = total / max(1, count)
    return {"answer_nll": nll, "answer_ppl": ppl(nll), "final_answer_acc_tf": correct / len(pairs),
            "gen_ceiling": sum(end <= cfg["max_gen_toks"] for _, end in spans) / len(pairs)}


def reference(tokenizer, cfg: dict) -> dict:
    """The unigram reference (`suites.train.unigram`): the run's own training answer tokens, scored on the
    answer tokens of the evaluated test problems (the tokens `answer_nll` scores)."""
    from suites.train import unigram

    train = train_batches(tokenizer, {**cfg, "steps": cfg["steps"] * cfg["grad_accum"]})
    pairs = data.gsm8k_eval_pairs(tokenizer, cfg["eval_limit"], prompt_format(cfg))
    scored = [data.supervised_batch(pairs[i : i + 16], tokenizer) for i in range(0, len(pairs), 16)]
    return {"unigram_answer_nll": unigram.unigram_nll(train, scored, unigram.vocab_size(tokenizer))}


def tracking_batch(tokenizer, cfg: dict) -> dict:
    """The tracking diagnostic's held-out batch (`suites.measure.tracking`): the first test problems, prompt
    and answer, `track_tokens // seq_len` of them (at least one), right-padded."""
    rows = max(1, option(cfg, "track_tokens") // cfg["seq_len"])
    return data.supervised_batch(data.gsm8k_eval_pairs(tokenizer, rows, prompt_format(cfg)), tokenizer)


def heldout_loss(model, tokenizer, cfg: dict, device: str) -> float:
    """`answer_nll` alone: the loss curve's periodic point (`eval_every`)."""
    return answer_scores(model, tokenizer, cfg, device)["answer_nll"]


def lm_eval_accuracy(model, tokenizer, cfg: dict, device: str) -> dict:
    """Run lm-eval's gsm8k definition on the first `eval_limit` test problems (all when None)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    for name in ("lm-eval", "lm_eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets  # lm-eval's own dependency

    datasets.disable_progress_bars()
    model.eval()
    with tempfile.TemporaryDirectory(prefix="oasis-lm-eval-") as include:
        gsm8k_dir = _lm_eval_data(Path(include))
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


def _lm_eval_data(scratch: Path) -> str:
    """The folder of train.jsonl and test.jsonl that the task yaml reads: the offline copy, or (rows from
    the Hub) the same rows written into `scratch`, so that lm-eval scores the rows the run was given."""
    if all(sources.source("gsm8k", split) == "offline" for split in ("train", "test")):
        return str(sources.offline_path("gsm8k", "test").parent.resolve())
    folder = scratch / "gsm8k"
    for split in ("train", "test"):
        lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in data.gsm8k_examples(split))
        files.atomic_write(folder / f"{split}.jsonl", lines.encode())
    return str(folder.resolve())


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
    """The teacher-forced scores of the model a run starts from, with the evaluation's own function and
    problems (recorded as `metrics.step0`, so every record shows what training changed)."""
    return answer_scores(model, tokenizer, cfg, device)


def evaluate(model, tokenizer, cfg: dict, device: str) -> dict:
    metrics = lm_eval_accuracy(model, tokenizer, cfg, device)
    metrics.update(answer_scores(model, tokenizer, cfg, device))
    return metrics
