"""Suites: what a run trains on and how it is scored, one module per suite.

Each module exposes
    FINETUNE: bool                                   starts from a pretrained base (else random init)
    check_data() -> None                             raises sources.DataMissing naming the expected path
    train_batches(tokenizer, cfg) -> list[dict]      deterministic in cfg["seed"]; same for every method
    evaluate(model, tokenizer, cfg, device) -> dict  the suite's metrics (one shared function per suite)
    before_training(model, tokenizer, cfg, device) -> dict
                                                     the suite's cheap metrics (NLL / loss) of the model a run
                                                     starts from, recorded as metrics["step0"]
    HEADLINE: str                                    the suite's headline metric (reports)
    SUMMARY: tuple[str, ...]                         the metrics printed in the sweep's summary table
"""

from __future__ import annotations

import importlib

SUITES = ("gsm8k", "humaneval", "c4")


def get(suite: str):
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    return importlib.import_module(f"suites.evaluate.tasks.{suite}")
