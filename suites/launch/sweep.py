"""A sweep: every planned config without an ok record runs through a launcher (`suites.launch.launchers`),
with a progress bar, then one summary table of the records."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from suites.core import cli, records
from suites.launch import launchers

INTERRUPTED = "interrupted: finished runs are recorded; run the same command again to resume"


def summary(rows: list[dict], columns: tuple[str, ...]) -> str:
    """The table printed after a sweep: peak memory, the suite's summary metrics, speed, wall time."""
    width = max(14, *(len(c) for c in columns))
    heads = " ".join(f"{c:>{width}}" for c in columns)
    lines = [f"{'method':<18} {'status':<9} {'peak MiB':>9} {heads} {'tokens/s':>9} {'wall s':>7}  run_id"]
    for rec in rows:
        mem = rec.get("memory") or {}
        peak = f"{mem['peak_bytes'] / 2**20:.1f}" if mem.get("peak_bytes") is not None else "-"
        values = []
        for column in columns:
            metric = (rec.get("metrics") or {}).get(column)
            values.append(f"{metric:.4f}" if isinstance(metric, (int, float)) else "-")
        speed = rec.get("speed") or {}
        tps = f"{speed['tokens_per_s']:.0f}" if speed.get("tokens_per_s") else "-"
        lines.append(
            f"{rec['method']:<18} {rec['status']:<9} {peak:>9} {' '.join(f'{v:>{width}}' for v in values)} "
            f"{tps:>9} {rec.get('wall_s') or 0:>7.1f}  {rec['run_id']}"
        )
        if rec.get("error"):
            lines.append(f"{'':<18} {rec['error'][:100]}")
    return "\n".join(lines)


def sweep(configs: list[dict], columns: tuple[str, ...], out: Path, desc: str, launcher=None) -> int:
    """Run every config that has no ok record yet (through `launcher`, default one after another here),
    then print the summary; the exit status."""
    from tqdm import tqdm

    launcher = launcher or launchers.Sequential()
    done = records.completed_hashes(out)
    todo = [c for c in configs if records.config_hash(c) not in done]
    if len(todo) < len(configs):
        print(
            f"resuming: {len(configs) - len(todo)} of {len(configs)} runs already have an ok record in {out}",
            file=sys.stderr,
        )
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc=desc, unit="run", position=0,
               dynamic_ncols=True, disable=bool(os.environ.get("OASIS_NO_PROGRESS")))
    try:
        for cfg, outcome in launcher.run(todo, out):
            bar.set_postfix(method=cfg["method"], refresh=True)
            if outcome != "ran":
                why = "is running it" if outcome == "locked" else "finished it"
                bar.write(f"skipped {records.run_id(cfg)}: another sweep into {out} {why}", sys.stderr)
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        print(("\n" if sys.stderr.isatty() else "") + INTERRUPTED, file=sys.stderr)
        return cli.EXIT_INTERRUPTED
    bar.close()
    wanted = {records.config_hash(c) for c in configs}
    latest = {}
    for rec in records.load_records(out, recursive=False):
        if rec["config_hash"] in wanted:
            latest[rec["config_hash"]] = rec
    rows = [latest[records.config_hash(c)] for c in configs if records.config_hash(c) in latest]
    print(summary(rows, columns))
    print(f"records: {out}/ ({len(rows)} runs)")
    return 0 if all(r["status"] == "ok" for r in rows) else 1
