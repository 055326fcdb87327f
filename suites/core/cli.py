"""Command-line plumbing shared by every entry point (`suites.run`, `suites.memory`, `suites.memcheck`,
`reports.build`): one-line usage errors with exit status 2, a clean Ctrl-C, and the offline environment.

    from suites.core.cli import Parser, UsageError, cli_main
    def main(argv=None) -> int:
        args = parser().parse_args(argv)       # bad arguments raise UsageError
        ...
    if __name__ == "__main__":
        sys.exit(cli_main("python -m suites.x", main))

This module imports nothing heavy (no torch), so that bad input is reported in well under a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable

# No hub on the machines this suite targets by default; a run that needs the hub says so itself.
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input: one line on stderr, exit 2, nothing written."""


class Parser(argparse.ArgumentParser):
    """argparse, except that a bad argument raises UsageError (one line) instead of printing usage."""

    def error(self, message):
        raise UsageError(message)


def offline_env() -> None:
    """Default the Hugging Face libraries to offline mode (an explicit setting in the environment wins)."""
    for var in OFFLINE_VARS:
        os.environ.setdefault(var, "1")


def quiet_libraries() -> None:
    """Silence library notices that would break the one-line-error contract or bury the output: bitsandbytes
    announces an optional CPU kernel package on import; peft (LoRA) calls a transformers property that
    transformers 5 deprecates, a FutureWarning on every LoRA build that is neither ours nor news."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)


def cli_main(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run `main(argv)` as a command: offline environment, UsageError and ValueError from input checks as
    `prog: error: ...` (exit 2), Ctrl-C as one line (exit 130). Anything else is a bug and propagates."""
    offline_env()
    quiet_libraries()
    try:
        return main(argv)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _int_at_least(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, with its own one-line message."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0, with its own one-line message."""
    return _int_at_least(text, 0, "an integer >= 0")


def key_value(text: str):
    """`--set key=value` (JSON value, else the text) for argparse."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return key, value


def dtype_name(text: str) -> str:
    """A `--dtype` of `suites.core.dtypes` (any alias), canonical, for argparse."""
    try:
        from suites.core import dtypes

        return dtypes.canonical(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
