"""Read run records (DESIGN §3.4) and memory-estimate files, tolerate bad ones, group runs by config.

Nothing here computes a metric: a `Group` only collects the numbers its records carry and summarises
them across seeds (reports.stats). Loading also settles provenance: smoke-profile records are set aside,
and several records of one (configuration, seed) are compared (reproduced / differ / different bases)
instead of being pooled as if they were more seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from reports.stats import Stat
from suites.core import selection

# Fields without which a file cannot be placed in any table or figure.
REQUIRED = ("schema", "run_id", "suite", "profile", "method", "status", "config", "config_hash")
STATUSES = ("ok", "diverged", "oom", "error")
CATEGORIES = ("params", "grads", "optimizer", "activations", "other")
# Keys whose modal value picks a method's reference configuration (main table, loss curves, breakdown);
# ties are broken by PREFERRED (r=32 is the rank the OASIS paper reports).
REFERENCE_KEYS = ("rank", "subspace_lr")
PREFERRED = {"rank": 32}


SEED_DERIVED = ("seed", "base_hash")


def config_key(config: dict) -> str:
    """Hash of a config with `seed` removed: runs sharing it are seeds of one configuration.

    `base_hash` goes too: the harness derives it from the base's own config (older harnesses from the run
    seed, so it differed per seed). `base_seed` stays, as do model, base_steps and base_lr, so genuinely
    different bases are different configurations. Whether records really started from the same weights is
    checked on `env.base_checksum` (see _resolve_replicates and reports.compare).
    """
    rest = {k: v for k, v in config.items() if k not in SEED_DERIVED}
    blob = json.dumps(rest, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def is_fixture(rec: dict) -> bool:
    env = rec.get("env")
    return isinstance(env, dict) and "fixture" in str(env.get("note", "")).lower()


@dataclass
class Run:
    path: str   # relative to the results root, for messages
    rec: dict

    def __getattr__(self, name):  # suite, profile, method, status, config, config_hash, ...
        try:
            return self.__dict__["rec"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def ok(self) -> bool:
        return self.rec["status"] == "ok"

    @property
    def seed(self):
        return self.rec["config"].get("seed")

    def get(self, *keys):
        """Nested lookup (`run.get("memory", "peak_bytes")`); None when any level is missing."""
        node = self.rec
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return None
            node = node[k]
        return node


def seed_order(seed) -> tuple:
    """Sort key for seeds: integers by value, anything else (None, text) after them."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return (0, seed, "")
    return (1, 0, str(seed))


def seeds_text(seeds) -> str:
    return ",".join(str(s) for s in seeds) or "none"


@dataclass
class Group:
    """All seeds of one configuration of one method in one suite/profile; or, after `restrict`, a view
    of it on a stated seed set (`full` then keeps the whole group, for status counts)."""
    suite: str
    profile: str
    method: str
    key: str
    config: dict                      # the shared config, without seed
    runs: list[Run] = field(default_factory=list)
    full: Group | None = None

    @property
    def ok_runs(self) -> list[Run]:
        return [r for r in self.runs if r.ok]

    @property
    def seeds(self) -> list:
        """Seeds with an ok run, in seed order."""
        return sorted({r.seed for r in self.ok_runs}, key=seed_order)

    @property
    def all_seeds(self) -> list:
        """Seeds with any run (ok or not)."""
        return sorted({r.seed for r in self.runs}, key=seed_order)

    @property
    def fixture(self) -> bool:
        return any(is_fixture(r.rec) for r in self.runs)

    def restrict(self, seeds) -> Group:
        """This configuration on exactly `seeds` (runs of other seeds left out)."""
        keep = set(seeds)
        return Group(self.suite, self.profile, self.method, self.key, self.config,
                     [r for r in self.runs if r.seed in keep], self.full or self)

    def by_seed(self, *keys) -> dict:
        """{seed: recorded number at `keys`} over ok runs with a finite number there."""
        out = {}
        for r in self.ok_runs:
            v = number(r.get(*keys))
            if v is not None:
                out[r.seed] = v
        return out

    def values(self, *keys) -> list[float]:
        """The recorded number at `keys` for every ok seed that has a finite one, in seed order."""
        vals = self.by_seed(*keys)
        return [vals[s] for s in sorted(vals, key=seed_order)]

    def stat(self, *keys) -> Stat | None:
        vals = self.values(*keys)
        return Stat.of(vals) if vals else None

    def status_counts(self) -> Counter:
        """Statuses of the runs on this view's seeds, plus every failed run of the whole configuration:
        an extra ok seed outside the view changes nothing, a failure anywhere stays visible."""
        mine = {id(r) for r in self.runs}
        failed = [r for r in (self.full or self).runs if not r.ok and id(r) not in mine]
        return Counter(r.status for r in self.runs + failed)

    def sources(self) -> list[str]:
        return sorted({str(r.get("memory", "source")) for r in self.ok_runs if r.get("memory", "source")})

    def label(self, varying: list[str] = ()) -> str:
        extra = ", ".join(f"{k}={fmt_value(self.config.get(k))}" for k in varying)
        return f"{self.method} ({extra})" if extra else self.method


def number(v) -> float | None:
    """A recorded finite number as float, else None (bools, nulls, text and NaN are not numbers)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def metric_names(groups: list[Group]) -> set[str]:
    """Metric keys with at least one recorded number among these groups' ok runs."""
    return {m for g in groups for r in g.ok_runs for m in (r.get("metrics") or {}) if g.values("metrics", m)}


def fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


SMOKE_PROFILES = ("smoke",)  # test/CI profiles: never in paper-style tables or figures
REL_TOL = 1e-6  # two records of one configuration agree on a metric within this relative difference


@dataclass
class Replicate:
    """Several ok records of one (configuration, seed), compared with each other.

    kind: "reproduced" (metrics within REL_TOL, memory identical; `used` stands for all), "differs"
    (same base, numbers disagree; `used` is the newest record and the table says so), or "bases"
    (different base checksums, or different base_hash with no checksum: different experiments, so the
    seed is left out of this configuration and `used` is None).
    """
    kind: str
    suite: str
    profile: str
    method: str
    seed: object
    used: Run | None
    others: list[Run]
    differences: list[str]       # "metrics.answer_nll 5.09 (`a.json`) vs 4.71 (`b.json`)", ...


@dataclass
class Loaded:
    runs: list[Run]
    estimates: list[dict]              # memory-estimate files, normalised (see _as_estimate)
    skipped: list[tuple[str, str]]     # (file, reason)
    superseded: list[tuple[str, str]]  # (file, kept file): a not-ok record replaced by a re-run
    smoke: list[Run] = field(default_factory=list)            # smoke-profile records, set aside
    replicates: list[Replicate] = field(default_factory=list)


def load(results: Path) -> Loaded:
    """Every *.json under `results` (recursively), in sorted order so the output is deterministic."""
    runs, estimates, skipped = [], [], []
    for path in sorted(results.rglob("*.json")):
        rel = path.relative_to(results).as_posix()
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            skipped.append((rel, f"not valid JSON ({e})"))
            continue
        if rel.split("/", 1)[0] in OTHER_TOOLS_FOLDERS or _is_companion(data):
            continue  # memcheck's baseline, suites.memtable's points, ...: files of other tools
        est = _as_estimate(data)
        if est is not None:
            est["path"] = rel
            estimates.append(est)
            continue
        problem = _check_record(data)
        if problem:
            skipped.append((rel, problem))
            continue
        runs.append(Run(rel, data))
    smoke = [r for r in runs if r.profile in SMOKE_PROFILES]
    runs = [r for r in runs if r.profile not in SMOKE_PROFILES]
    runs, superseded, replicates = _resolve_replicates(runs)
    return Loaded(runs, estimates, skipped, superseded, smoke, replicates)


# folders of results/ that hold other tools' outputs, no run records: suites.speed's tables and
# suites.opcheck's baseline (speed/), tools/oja_study.py's measurements (oja/)
OTHER_TOOLS_FOLDERS = ("speed", "oja")


def _is_companion(data) -> bool:
    """Files that live under results/ but are not run records or plain estimates."""
    if not isinstance(data, dict):
        return False
    return ({"peaks", "claims"} <= data.keys() or {"before", "after"} <= data.keys()
            or data.get("tool") == "suites.memtable")


def _check_record(data) -> str | None:
    if not isinstance(data, dict):
        return "not a JSON object"
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        return f"missing required field(s): {', '.join(missing)}"
    if not isinstance(data["config"], dict):
        return "config is not an object"
    if data["status"] not in STATUSES:
        return f"unknown status {data['status']!r}"
    for section in ("metrics", "memory", "speed", "subspace"):
        if section in data and data[section] is not None and not isinstance(data[section], dict):
            return f"{section} is not an object"
    if "curve" in data and data["curve"] is not None and not isinstance(data["curve"], list):
        return "curve is not a list"
    return None


def _newest(r: Run) -> tuple:
    return (r.ok, str(r.rec.get("started_at", "")), r.path)


def _resolve_replicates(runs: list[Run]):
    """One record per (configuration, seed). A not-ok record is superseded by any re-run (ok beats
    not-ok, then newest). Several ok records are compared: see `Replicate`."""
    buckets = defaultdict(list)
    for r in runs:
        buckets[(r.suite, r.profile, r.method, config_key(r.config), json.dumps(r.seed))].append(r)
    kept, superseded, replicates = [], [], []
    for rs in buckets.values():
        rs.sort(key=_newest)
        oks = [r for r in rs if r.ok]
        if len(oks) < 2:
            kept.append(rs[-1])
            superseded += [(r.path, rs[-1].path) for r in rs[:-1]]
            continue
        superseded += [(r.path, oks[-1].path) for r in rs if not r.ok]
        first = oks[-1]
        where = (first.suite, first.profile, first.method, first.seed)
        base = _base_difference(oks)
        if base:
            replicates.append(Replicate("bases", *where, None, oks, base))
            continue
        kept.append(first)
        for other in reversed(oks[:-1]):
            diffs = differences(first, other)
            replicates.append(Replicate("differs" if diffs else "reproduced", *where, first, [other], diffs))
    kept.sort(key=lambda r: r.path)
    replicates.sort(key=lambda p: (p.suite, p.profile, method_rank(p.method), p.method, seed_order(p.seed),
                                   [r.path for r in p.others]))
    return kept, sorted(superseded), replicates


def _base_difference(runs: list[Run]) -> list[str]:
    """Why these records did not start from one base ([] when they did, as far as records tell)."""
    sums = {r.get("env", "base_checksum") for r in runs}
    if len(sums - {None}) > 1:
        return ["env.base_checksum " + " vs ".join(f"{r.get('env', 'base_checksum')} (`{r.path}`)"
                                                     for r in runs)]
    if None in sums and len({json.dumps(r.config.get("base_hash")) for r in runs}) > 1:
        return ["config.base_hash " + " vs ".join(f"{r.config.get('base_hash')} (`{r.path}`)" for r in runs)
                + " and no env.base_checksum to show the weights are the same"]
    return []


def _leaves(node, prefix: str) -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_leaves(v, f"{prefix}.{k}"))
        return out
    return {prefix: node}


def differences(a: Run, b: Run) -> list[str]:
    """What two records of one (configuration, seed) disagree on: a metric beyond REL_TOL (relative), any
    memory number at all, or a value one of them lacks. Speed and wall time are not compared."""
    out = []
    for section, exact in (("metrics", False), ("memory", True)):
        la, lb = _leaves(a.get(section) or {}, section), _leaves(b.get(section) or {}, section)
        for k in sorted(set(la) | set(lb)):
            va, vb = la.get(k), lb.get(k)
            na, nb = number(va), number(vb)
            if na is not None and nb is not None:
                same = na == nb if exact else math.isclose(na, nb, rel_tol=REL_TOL, abs_tol=1e-12)
            else:
                same = va == vb
            if not same:
                out.append(f"{k} {_show(va)} (`{a.path}`) vs {_show(vb)} (`{b.path}`)")
    return out


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:.7g}"
    return "absent" if v is None else str(v)


def _as_estimate(data) -> dict | None:
    """A `suites.memory --json` file, as {"meta": {model, batch, seq, rank, ...}, "rows": [{method,
    peak_bytes, source, breakdown}]}.

    `suites.memory` writes {"config": {model, batch, seq, rank, dtype, checkpointing, ...}, "results":
    [{method, peak_bytes, breakdown, source, ...}]}; a top-level list of rows, or `methods`/`rows` as a
    list or a mapping, are read too. Returns None for anything that looks like a run record instead.
    """
    if isinstance(data, dict) and "run_id" in data:
        return None
    meta, rows = {}, None
    if isinstance(data, list):
        rows = data
    elif isinstance(data, dict):
        meta = {k: v for k, v in data.items() if not isinstance(v, (list, dict))}
        if isinstance(data.get("config"), dict):
            meta.update({k: v for k, v in data["config"].items() if not isinstance(v, (list, dict))})
        for k in ("methods", "rows", "results"):
            if isinstance(data.get(k), list):
                rows = data[k]
            elif isinstance(data.get(k), dict):
                rows = [{"method": m, **v} for m, v in data[k].items() if isinstance(v, dict)]
            if rows is not None:
                break
    if not rows or not all(isinstance(r, dict) and "method" in r for r in rows):
        return None
    norm = []
    for r in rows:
        mem = r.get("memory") if isinstance(r.get("memory"), dict) else r
        if not isinstance(mem.get("peak_bytes"), (int, float)):
            continue
        norm.append({"method": r["method"], "peak_bytes": mem["peak_bytes"],
                     "source": mem.get("source", "estimate"),
                     "breakdown": mem.get("breakdown") if isinstance(mem.get("breakdown"), dict) else None,
                     **{k: r[k] for k in ("model", "batch", "seq", "seq_len", "rank") if k in r}})
    if not norm:
        return None
    return {"meta": meta, "rows": norm}


SOURCE_WORDS = {"estimate": "FakeTensorMode estimate, nothing allocated",
                "cpu-tracked": "CPU tracked tensor bytes", "cuda": "CUDA max_memory_allocated"}


def model_label(model) -> str:
    """A model as a reader knows it: a preset or hub id as given, a local file or folder by its name (a path
    on the machine that made the record, e.g. `.devdata/x.config.json`, means nothing to a reader)."""
    text = str(model)
    local = text.startswith((".", "/", "~")) or text.endswith((".json", ".gguf")) or text.count("/") > 1
    return Path(text).name if local else text


def describe_estimate(est: dict) -> tuple[str, str]:
    """(setting, source) of a memory-estimate file in words, e.g. ("model=llama-2-7b, batch=8, seq=512,
    rank=32, dtype=bf16, activation checkpointing", "FakeTensorMode estimate, nothing allocated")."""
    meta = est["meta"]
    keys = ("model", "batch", "seq", "seq_len", "rank", "dtype")
    parts = [f"{k}={model_label(meta[k]) if k == 'model' else fmt_value(meta[k])}" for k in keys if k in meta]
    if meta.get("checkpointing"):
        parts.append("activation checkpointing")
    if meta.get("layerwise"):
        parts.append("layer-wise optimizer steps")
    if meta.get("loss") not in (None, "full"):
        parts.append(f"{meta['loss']} loss")
    if meta.get("lean_blocks"):
        parts.append("lean norm/SwiGLU")
    sources = sorted({str(r.get("source", "estimate")) for r in est["rows"]})
    return ", ".join(parts) or est["path"], "; ".join(SOURCE_WORDS.get(s, s) for s in sources)


def group_runs(runs: list[Run]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for r in runs:
        key = config_key(r.config)
        gk = (r.suite, r.profile, r.method, key)
        if gk not in groups:
            cfg = {k: v for k, v in r.config.items() if k not in SEED_DERIVED}
            groups[gk] = Group(r.suite, r.profile, r.method, key, cfg)
        groups[gk].runs.append(r)
    for g in groups.values():
        g.runs.sort(key=lambda r: (seed_order(r.seed), r.path))
    return sorted(groups.values(), key=lambda g: (g.suite, g.profile, method_rank(g.method), g.method, g.key))


# Canonical method order for rows, legends and bars (mission methods, then extras, then anything new).
METHOD_ORDER = ("adam", "lora", "galore", "ldadam", "pca", "oasis",
                "adam8bit", "galore8bit", "compact", "oasis-notransport", "oasis-frozen")


def method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def varying_keys(groups: list[Group], ignore=()) -> list[str]:
    """Config keys whose value differs between these groups (sorted), so labels can tell them apart."""
    keys = sorted({k for g in groups for k in g.config} - set(ignore))
    return [k for k in keys if len({json.dumps(g.config.get(k), sort_keys=True, default=str)
                                    for g in groups}) > 1]


def labels_for(groups: list[Group], ignore=()) -> dict[int, str]:
    """Method name, plus the config keys that tell apart groups of the same method (keyed by id)."""
    by_method = defaultdict(list)
    for g in groups:
        by_method[g.method].append(g)
    out = {}
    for gs in by_method.values():
        keys = varying_keys(gs, ignore=ignore)
        for g in gs:
            out[id(g)] = g.label(keys)
    return out


def lr_line(gs: list[Group]) -> tuple[list[Group], list]:
    """Of one method's groups, the learning-rate ablation: the most points (then runs) of groups identical
    but for `lr`, with the seeds every point has; ([], []) when there is none."""
    lines = defaultdict(list)
    for g in gs:
        rest = {k: v for k, v in g.config.items() if k != "lr"}
        lines[json.dumps(rest, sort_keys=True, default=str)].append(g)
    lines = [pts for pts in lines.values() if len({json.dumps(g.config.get("lr")) for g in pts}) >= 2]
    if not lines:
        return [], []
    pts = max(lines, key=lambda pts: (len(pts), sum(len(g.runs) for g in pts)))
    common = set.intersection(*(set(g.seeds) for g in pts))
    return sorted(pts, key=lambda g: g.config.get("lr")), sorted(common, key=seed_order)


def validated_lr(gs: list[Group]) -> float | None:
    """The learning rate chosen on the validation split (`suites.core.selection`: lowest mean `val_loss` over
    the seeds every rate of the method's lr ablation has); None when there is no such ablation or no
    `val_loss` in its records (older records: the modal rule below decides)."""
    pts, common = lr_line(gs)
    scored = {}
    for g in pts:
        vals = g.by_seed("metrics", selection.METRIC)
        if common and all(s in vals for s in common):
            scored[g.config.get("lr")] = [vals[s] for s in common]
    return selection.best_rate(scored) if len(scored) >= 2 else None


def reference_groups(groups: list[Group]) -> list[Group]:
    """Per method, the groups at its reference configuration: the learning rate chosen on the validation
    split where the records hold a learning-rate ablation (`validated_lr`), then for each config key
    (REFERENCE_KEYS first)
    the value most of its groups use (a one-at-a-time sweep varies one key around the default, so the
    default is the mode); ties go to the value most runs of the suite/profile use (the profile default,
    shared by every method), then to PREFERRED. Keys it cannot resolve stay unresolved: those groups
    all remain, as separate rows/lines."""
    by_method, by_setting = defaultdict(list), defaultdict(list)
    for g in groups:
        by_method[(g.suite, g.profile, g.method)].append(g)
        by_setting[(g.suite, g.profile)].append(g)
    out = []
    for (suite, profile, _), gs in by_method.items():
        everyone = by_setting[(suite, profile)]
        lr = validated_lr(gs)
        cands = [g for g in gs if g.config.get("lr") == lr] if lr is not None else list(gs)
        others = sorted({k for g in gs for k in g.config} - set(REFERENCE_KEYS))
        for key in (*REFERENCE_KEYS, *others):
            counts = Counter(json.dumps(g.config.get(key), default=str) for g in gs)
            if len(counts) < 2:
                continue
            top = max(counts.values())
            winners = [v for v, c in counts.items() if c == top]
            pref = json.dumps(PREFERRED.get(key), default=str) if key in PREFERRED else None
            if len(winners) > 1:  # tie: the value most runs of this suite/profile use, then PREFERRED
                overall = Counter(json.dumps(g.config.get(key), default=str) for g in everyone)
                best = max(overall[v] for v in winners)
                winners = [v for v in winners if overall[v] == best]
            if len(winners) > 1:
                if pref not in winners:
                    continue
                winners = [pref]
            narrowed = [g for g in cands if json.dumps(g.config.get(key), default=str) == winners[0]]
            cands = narrowed or cands
        out += cands
    return sorted(out, key=lambda g: (g.suite, g.profile, method_rank(g.method), g.method, g.key))
