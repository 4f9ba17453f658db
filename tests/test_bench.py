"""The overhead benchmark runs in its tiny mode and produces every row (its numbers are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_overhead_benchmark_tiny_mode_produces_every_row(tmp_path):
    out = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, "bench/overhead.py", "--tiny", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import overhead
    finally:
        sys.path.pop(0)
    results = json.loads(out.read_text())
    rows = results["cases"]["mlp3x16"]
    assert list(rows) == list(overhead.VARIANTS)
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["ratio"] > 0 and row["peak_rss_mb"] > 0
    assert rows["bare PyTorch loop"]["ratio"] == 1.0
    assert [d["flush_denormal"] for d in results["denormals"]] == [True, False]
    for variant in overhead.VARIANTS:
        assert variant.split(",")[0] in done.stdout
    assert "denormals flushed" in done.stdout and "denormals kept" in done.stdout
