"""bench_reskd's pieces on the digits classifier (scikit-learn's 8×8 ``load_digits``): one tiny run end to end."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_reskd import QUICK, run, save, table
from tests.test_distill import digits_teacher

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def test_a_tiny_run_scores_times_and_saves_every_row(tmp_path: Path) -> None:
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    x, y = (x / 16.0).astype(np.float32), y.astype(np.int64)
    teacher = digits_teacher(x, y)
    s = replace(QUICK, steps=30, student_ratio=0.2, res_ratios=(0.15,), targets=(0.3,), max_drops=(0.5,), repeat=2,
                threads=1, test_images=200, out=tmp_path, name="tiny")  # fmt: skip
    results = run(s, teacher, (x[:1400], y[:1400]), (x[1400:1600], y[1400:1600]))
    rows = results["rows"]
    assert list(rows)[:5] == ["teacher", "S0", "S0 + R1", "adaptive, target flops 0.3", "adaptive, max drop 0.5"]
    members = results["report"]["members"]
    assert rows["S0 + R1"]["flops"] == pytest.approx(members[0]["flops"] + members[1]["flops"])
    assert rows["teacher"]["accuracy"] > 90.0
    adaptive = rows["adaptive, target flops 0.3"]
    assert adaptive["flops"] == pytest.approx(members[0]["flops"] + adaptive["reach"][1] * members[1]["flops"])
    assert all(r["latency_ms"][1] > 0 and r["latency_ms"][32] > 0 for r in rows.values())
    # the InherNet student of the adaptive rows' FLOPs (within 2 % of each other: one student), trained and timed
    partner = adaptive["inhernet"]
    assert partner.startswith("InherNet ratio") and rows["adaptive, max drop 0.5"]["inhernet"] == partner
    assert rows[partner]["flops"] == pytest.approx(adaptive["flops"], rel=0.05) and rows[partner]["accuracy"] > 50
    lines = table(results)
    assert [line[0] for line in lines][3:5] == ["adaptive, target flops 0.3", partner]
    assert [line[-1] for line in lines][2] == "1.00"  # the full cascade against itself
    save(results, s, "Settings: tiny.")
    md = (tmp_path / "tiny.md").read_text()
    assert (tmp_path / "tiny.json").is_file() and "S0 + R1" in md and "Settings: tiny." in md
    assert "- accuracy target: **not met**" in md and "batch-32 latency" in md


def test_only_a_run_below_the_protocol_is_called_reduced() -> None:
    from benchmarks.bench_reskd import Settings, describe

    assert "Reduced run" not in describe(Settings(), 60.0)
    assert "Reduced run" not in describe(Settings(epochs=5), 60.0)  # more training than the defaults
    assert describe(Settings(images=20000), 60.0).startswith("**Reduced run** (the defaults: 60,000 images, 3 epochs)")
    assert "Reduced run" in describe(Settings(epochs=2), 60.0) and "Reduced run" in describe(Settings(steps=9), 60.0)
    assert "InherNet rows: compress" in describe(Settings(), 1.0)
    assert "No InherNet rows" in describe(Settings(inhernet=False), 1.0)
