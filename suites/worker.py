"""The process of one run: `python -m suites.worker SPEC.json` (started by `suites.run`; the run itself is
`suites.launch.recipe`). Exit status: 0 ok, 3 the run ended diverged/oom/error (its record says why), 130
interrupted (no record).

Ctrl-C in a terminal reaches every process of the sweep at once. The sweep (`suites.run`) says so in one
line; this process ends quietly: SIGINT raises SystemExit here, which unwinds like an exception (a record
being written is never left half-written) but prints no traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

EXIT_FAILED_RUN = 3
EXIT_INTERRUPTED = 130


def _exit_quietly(signum, frame):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the unwinding short
    raise SystemExit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m suites.worker SPEC.json (started by python -m suites.run)", file=sys.stderr)
        return 2
    from suites.core.cli import offline_env, quiet_libraries

    offline_env()
    quiet_libraries()
    if os.environ.get("OASIS_NO_PROGRESS"):  # also the bars transformers draws when it loads or saves a model
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    from suites.launch import recipe

    spec = json.loads(Path(argv[0]).read_text())
    return 0 if recipe.run(spec)["status"] == "ok" else EXIT_FAILED_RUN


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _exit_quietly)  # before the heavy imports, which take seconds
    sys.exit(main())
