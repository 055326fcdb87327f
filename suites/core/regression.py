"""The regression-check flow that `suites.memcheck` (peak memory) and `suites.opcheck` (op counts) share:
measure
today's values, compare them with a committed JSON baseline, and fail on a change beyond the baseline's
tolerance either way until `--update --reason "..."` rewrites it (the reason, the date, the git commit and
every changed value go into the baseline's `history`).

    data = regression.load(path, max_tolerance)          # JSON, `configs`, `tolerance`; UsageError otherwise
    ...                                                  # the tool's own checks of its values
    regression.load_history(data, path)
    regression.check_flags(args, "peaks")                  # --update needs --reason, --reason needs --update
    if args.update: regression.check_writable(args.baseline)
    ...measure, compare: rows with a `verdict` of ok | GREW | FELL | NEW...
    problems = regression.problems(rows, tol)              # "2 grew by more than 1%", ...
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

from suites.core import records
from suites.core.cli import UsageError
from suites.core.files import OutputError, check_output_file

VERDICTS = ("GREW", "FELL", "NEW")


def load(path: Path, max_tolerance: float, *, nonempty: bool = False) -> dict:
    """The baseline at `path` with a `configs` object and a `tolerance` in [0, max_tolerance]; UsageError
    (one line) when it is not usable."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"baseline {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"baseline {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("configs"), dict) or (nonempty
                                                                                  and not data["configs"]):
        raise UsageError(f"baseline {path} has no 'configs' object")
    tol = data.get("tolerance")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol <= max_tolerance:
        raise UsageError(f"baseline {path}: tolerance must be a number in [0, {max_tolerance}], got {tol!r}")
    return data


def load_history(data: dict, path: Path) -> None:
    if not isinstance(data.setdefault("history", []), list):
        raise UsageError(f"baseline {path}: history must be a list")


def add_arguments(p: argparse.ArgumentParser, default: Path, values: str, update_help: str) -> None:
    """--baseline, --update, --reason ("why the {values} changed")."""
    p.add_argument("--baseline", type=Path, default=default, help=f"default: {default}")
    p.add_argument("--update", action="store_true", help=update_help)
    p.add_argument("--reason", help=f"why the {values} changed (required with --update; kept in the history)")


def check_flags(args, values: str) -> None:
    if args.update and not (args.reason or "").strip():
        raise UsageError(f'--update needs --reason "why the {values} changed" (it is kept in the baseline)')
    if args.reason is not None and not args.update:
        raise UsageError("--reason goes with --update")


def check_writable(path: Path) -> None:
    try:
        check_output_file(path, "--baseline")
    except OutputError as exc:
        raise UsageError(str(exc)) from None


def logger(quiet: bool):
    def log(msg):
        if not quiet:
            print(msg, file=sys.stderr, flush=True)
    return log


def history_entry(reason: str, changed: dict) -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": records.git_commit(), "reason": reason, "changed": changed}


def table(header: tuple, lines: list[tuple], left: int) -> str:
    """Columns aligned; the first `left` columns left-aligned, the rest (numbers) right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:{'<' if i < left else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*map(str, line)).rstrip() for line in (header, *lines))


def by_verdict(rows: list) -> tuple[list, list, list]:
    """(grew, fell, new) rows."""
    return tuple([r for r in rows if r.verdict == v] for v in VERDICTS)


def problems(rows: list, tol: float, *extra: tuple[list, str]) -> list[str]:
    """"N grew by more than 1%", ... for each kind of failed row, then `extra` (items, what) that are not
    empty."""
    grew, fell, new = by_verdict(rows)
    kinds = ((grew, f"grew by more than {tol:.0%}"), (fell, f"fell by more than {tol:.0%}"),
             (new, "not in the baseline"), *extra)
    return [f"{len(x)} {what}" for x, what in kinds if x]


def update_hint(prog: str) -> str:
    return (f'If the change is intended, run  {prog} --update --reason "what changed and why"\n'
            "and commit the baseline.")
