"""suites.memtable: which points the 7B table measures, and the verdicts it writes from them."""

from suites import memtable

GIB = 2**30


def test_points_cover_the_field_in_both_regimes_at_8_and_the_sweep_with_tricks():
    pts = memtable.points([1, 8, 32])
    rows = len(memtable.MISSION) + len(memtable.EXTRAS) + len(memtable.VARIANTS)
    # per checkpointing setting: stock at mb 8 only, tricks at every micro-batch
    assert len(pts) == 2 * rows * (1 + 3)
    assert {p["batch"] for p in pts if p["regime"] == "stock"} == {8}
    assert len({memtable.key(p) for p in pts}) == len(pts)


def test_verdict_names_ratios_and_who_is_below_oasis():
    peaks = {"adam": 100.0, "oasis": 40.0, "galore": 50.0, "lora": 45.0, "ldadam": 80.0, "apollo": 60.0,
             "adam8bit": 39.0, "qlora": 20.0}
    text = memtable._verdict(peaks)
    assert "oasis/adam = 0.400" in text
    assert "(lora) = 0.889" in text  # 40 / 45, the lowest of lora, galore, ldadam, apollo
    assert "full-parameter methods below oasis: adam8bit" in text
    assert "adapter methods below oasis: qlora" in text
    assert "lowest full-parameter" in memtable._verdict({**peaks, "adam8bit": 41.0})


def test_render_shows_measured_points_and_dashes_for_the_rest():
    done = {}
    for row, gib in (("adam", 50.0), ("oasis", 20.0)):
        p = {"row": row, "regime": "tricks", "checkpointing": False, "batch": 8}
        done[memtable.key(p)] = {**p, "peak_bytes": int(gib * GIB), "commit": "abc123",
                                 "breakdown": {c: 0 for c in ("params", "grads", "optimizer", "activations",
                                                              "other")}}
    text = memtable.render(done, [8])
    assert "| adam | 50.00 |" in text and "| oasis | 20.00 |" in text and "| lora | - |" in text
    assert "abc123" in text and "oasis/adam = 0.400" in text
