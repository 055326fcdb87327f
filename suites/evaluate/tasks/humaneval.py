"""HumanEval: fine-tune on an offline code corpus, score pass@1 and canonical-solution NLL.

Training data: function completions from the running interpreter's own standard-library sources
(`data.code_train_batches`): the prompt is a documented function's `def` line and docstring, as in
HumanEval, and the loss goes on its body only. Prompt format (`cfg["prompt_format"]`): `plain` is the
code itself; `chat` (instruct models) asks for the function in the user turn of the model's own chat
template and continues the assistant turn from the fenced prompt code (`data.encode_code`), in training,
generation and canonical NLL alike.
pass@1: one greedy completion per problem (`max_gen_toks` new tokens, cut at the usual stop strings),
executed with the problem's tests in `suites.evaluate.sandbox` (a contained child process per program, a pool
of them at a time, never inside the harness process); a program passes only if it exits 0 after its last
statement, so an accidental early exit fails (a program written to forge a pass is not stopped: see
`suites.evaluate.sandbox`).
`canonical_nll`: token-weighted NLL of the canonical solutions given their prompts.
"""

from __future__ import annotations

import torch

from suites.evaluate import sandbox
from suites.evaluate.tasks._eval import mean_nll, ppl, prompt_format
from suites.train import data, sources

FINETUNE = True
HEADLINE = "pass@1"
SUMMARY = ("pass@1", "canonical_nll")  # the summary table: pass@1 and the NLL that moves
STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "```")


def check_data() -> None:
    sources.check("humaneval", "test")


def train_batches(tokenizer, cfg: dict) -> list[dict]:
    return data.code_train_batches(
        tokenizer, steps=cfg["steps"], batch=cfg["batch"], seq_len=cfg["seq_len"], seed=cfg["seed"],
        fmt=prompt_format(cfg),
    )


def truncate(completion: str) -> str:
    cut = min([completion.find(s) for s in STOP if s in completion] or [len(completion)])
    return completion[:cut]


@torch.no_grad()
def greedy_completions(
    model, tokenizer, prompts: list[str], max_new: int, batch: int, device: str, fmt: str = "plain"
) -> list[str]:
    """One greedy completion of each HumanEval prompt, in prompt format `fmt`, cut at the stop strings."""
    if fmt == "chat":
        prompts = [data.code_chat_prompt(tokenizer, p) for p in prompts]
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last position of every row
    out = []
    try:
        for i in range(0, len(prompts), batch):
            enc = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True,
                            add_special_tokens=fmt == "plain").to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += [truncate(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train()
    return out


def run_program(program: str, timeout: float) -> bool:
    """True when `program` exited 0 after its last statement within `timeout` s, in the sandbox.

    An accidental early exit fails; a program written to forge a pass is not stopped
    (`suites.evaluate.sandbox`).
    """
    return sandbox.run(program, timeout).passed


def run_programs(programs: list[str], timeout: float) -> list[bool]:
    """`run_program` for many programs, in parallel across the CPUs this process may use."""
    return [outcome.passed for outcome in sandbox.run_many(programs, timeout)]


def program_for(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def canonical_nll(model, tokenizer, cfg: dict, device: str) -> float:
    """Token-weighted NLL of the canonical solutions given their prompts (the first `eval_limit` problems)."""
    pairs = []
    for p in data.humaneval_problems(cfg["eval_limit"]):
        pairs.append(data.encode_code(tokenizer, prompt_format(cfg), p["prompt"], p["canonical_solution"]))
    batches = [
        data.supervised_batch(pairs[i : i + cfg["eval_batch"]], tokenizer)
        for i in range(0, len(pairs), cfg["eval_batch"])
    ]
    return mean_nll(model, batches, device)


def before_training(model, tokenizer, cfg: dict, device: str) -> dict:
    """The canonical-solution NLL of the model a run starts from (recorded as `metrics.step0`)."""
    nll = canonical_nll(model, tokenizer, cfg, device)
    return {"canonical_nll": nll, "canonical_ppl": ppl(nll)}


def evaluate(model, tokenizer, cfg: dict, device: str) -> dict:
    problems = data.humaneval_problems(cfg["eval_limit"])
    completions = greedy_completions(
        model, tokenizer, [p["prompt"] for p in problems], cfg["max_gen_toks"], cfg["eval_batch"], device,
        prompt_format(cfg),
    )
    passed = run_programs([program_for(p, c) for p, c in zip(problems, completions)], cfg["exec_timeout"])
    nll = canonical_nll(model, tokenizer, cfg, device)
    return {
        "pass@1": sum(passed) / len(passed),
        "passed": int(sum(passed)),
        "eval_problems": len(problems),
        "canonical_nll": nll,
        "canonical_ppl": ppl(nll),
    }
