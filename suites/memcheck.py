"""Memory regression check: re-measure every method's peak on fixed configs and compare with a baseline.

    python -m suites.memcheck                      # compare with results/memory/baseline.json
    python -m suites.memcheck --baseline PATH      # another baseline file
    python -m suites.memcheck --update             # re-measure and rewrite the baseline (on purpose)

The baseline (JSON) holds
  tolerance   the relative growth of a peak that counts as a regression (at most 0.01)
  configs     named measurement configs: keyword arguments of `suites.memory.measure` plus `methods`;
              a deterministic CPU-tracked run of a smoke-size model and FakeTensor estimates at 1B/7B
  peaks       config name -> method -> peak bytes
  claims      ratios the project claims: {config, method, versus: [methods], max}: peak(method) divided by
              the lowest peak among `versus` must stay at or below `max`

Exit status: 0 every peak within tolerance and every claim holds; 1 a regression or a broken claim (each
one printed with its config, method and size); 2 usage error (unreadable or malformed baseline).
A peak that fell is reported too, as an improvement to lock in with `--update`. `--update` keeps the
configs, tolerance and claims and replaces the peaks; it still exits 1 if a claim does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_BASELINE = Path(__file__).resolve().parent.parent / "results" / "memory" / "baseline.json"
MAX_TOLERANCE = 0.01
MEASURE_KEYS = ("model", "kind", "batch", "seq", "rank", "dtype", "checkpointing", "attn", "loss",
                "loss_chunk", "lean_blocks", "window", "overrides", "kernel_policy")
MIB = 2**20


class UsageError(Exception):
    pass


def load_baseline(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"baseline {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"baseline {path} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("configs"), dict):
        raise UsageError(f"baseline {path} has no 'configs' object")
    tol = data.get("tolerance")
    if not isinstance(tol, (int, float)) or not 0 <= tol <= MAX_TOLERANCE:
        raise UsageError(f"baseline {path}: tolerance must be a number in [0, {MAX_TOLERANCE}], got {tol!r}")
    for name, cfg in data["configs"].items():
        unknown = set(cfg) - set(MEASURE_KEYS) - {"methods"}
        if unknown or not cfg.get("methods") or "model" not in cfg:
            raise UsageError(f"baseline {path}: config {name!r} needs model and methods "
                             f"and only keys of {', '.join(MEASURE_KEYS)}")
    for claim in data.get("claims", []):
        if claim.get("config") not in data["configs"] or not claim.get("versus") or "max" not in claim:
            raise UsageError(f"baseline {path}: malformed claim {claim!r}")
    data.setdefault("peaks", {})
    data.setdefault("claims", [])
    return data


def measure_all(configs: dict, log=print) -> dict:
    from suites.memory import measure

    peaks: dict[str, dict[str, int]] = {}
    for name, cfg in configs.items():
        kwargs = {k: v for k, v in cfg.items() if k in MEASURE_KEYS}
        model = kwargs.pop("model")
        peaks[name] = {}
        for method in cfg["methods"]:
            t0 = time.perf_counter()
            peaks[name][method] = measure(model, method, **kwargs)["peak_bytes"]
            log(f"  {name:<14} {method:<18} {peaks[name][method] / MIB:12.1f} MiB  "
                f"({time.perf_counter() - t0:.1f} s)")
    return peaks


def compare(baseline: dict, peaks: dict) -> tuple[list[str], list[str]]:
    """(regressions, notes): peaks grown beyond tolerance or missing; peaks that fell or are new."""
    tol = baseline["tolerance"]
    regressions, notes = [], []
    for name, methods in peaks.items():
        old_methods = baseline["peaks"].get(name, {})
        for method, new in methods.items():
            old = old_methods.get(method)
            if old is None:
                notes.append(f"{name}/{method}: no baseline peak yet ({new / MIB:.1f} MiB); run --update")
                continue
            change = (new - old) / old
            line = (f"{name}/{method}: peak {old / MIB:.1f} -> {new / MIB:.1f} MiB "
                    f"({change:+.2%}, tolerance {tol:.2%})")
            if change > tol:
                regressions.append("REGRESSION " + line)
            elif new < old:
                notes.append("improved   " + line + "; run --update to lock it in")
    return regressions, notes


def check_claims(claims: list, peaks: dict) -> tuple[list[str], list[str]]:
    broken, held = [], []
    for claim in claims:
        cfg = peaks.get(claim["config"], {})
        needed = [claim["method"], *claim["versus"]]
        missing = [m for m in needed if m not in cfg]
        if missing:
            broken.append(f"CLAIM {claim['config']}: cannot check {claim['method']} vs {claim['versus']}: "
                          f"no peak for {', '.join(missing)}")
            continue
        best = min(claim["versus"], key=lambda m: cfg[m])
        ratio = cfg[claim["method"]] / cfg[best]
        line = (f"{claim['config']}: {claim['method']} / {best} (lowest of {', '.join(claim['versus'])}) = "
                f"{ratio:.3f} (claimed <= {claim['max']})")
        if ratio <= claim["max"]:
            held.append(line)
        else:
            broken.append("CLAIM BROKEN " + line)
    return broken, held


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv=None) -> int:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    p = _Parser(prog="python -m suites.memcheck", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE, help=f"default: {DEFAULT_BASELINE}")
    p.add_argument("--update", action="store_true",
                   help="re-measure and rewrite the baseline's peaks (configs, tolerance, claims kept)")
    p.add_argument("--quiet", action="store_true", help="print only problems and the verdict")
    args = p.parse_args(argv)
    try:
        baseline = load_baseline(args.baseline)
    except UsageError as exc:
        print(f"python -m suites.memcheck: error: {exc}", file=sys.stderr)
        return 2

    def log(msg):
        if not args.quiet:
            print(msg)

    t0 = time.perf_counter()
    try:
        peaks = measure_all(baseline["configs"], log)
    except ValueError as exc:  # a config the registry or the model loader rejects
        print(f"python -m suites.memcheck: error: {exc}", file=sys.stderr)
        return 2
    broken, held = check_claims(baseline["claims"], peaks)
    if args.update:
        from suites.memory import write_json  # the same atomic writer as `suites.memory --json`

        write_json({**baseline, "peaks": peaks}, args.baseline)
        print(f"baseline {args.baseline} updated ({time.perf_counter() - t0:.0f} s)")
        for line in held:
            log("claim holds: " + line)
        for line in broken:
            print(line)
        return 1 if broken else 0
    regressions, notes = compare(baseline, peaks)
    for line in notes:
        log(line)
    for line in held:
        log("claim holds: " + line)
    for line in regressions + broken:
        print(line)
    verdict = "FAIL" if regressions or broken else "OK"
    print(f"memcheck {verdict}: {sum(len(m) for m in peaks.values())} peaks, {len(regressions)} regressions, "
          f"{len(broken)} broken claims ({time.perf_counter() - t0:.0f} s)")
    return 1 if regressions or broken else 0


if __name__ == "__main__":
    sys.exit(main())
