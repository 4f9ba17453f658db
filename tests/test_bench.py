"""The overhead benchmark runs in its tiny mode and produces every row (its numbers are never asserted)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("wandb", reason="the benchmark times the real wandb.watch")
if importlib.util.find_spec("lightning") is None and importlib.util.find_spec("pytorch_lightning") is None:
    pytest.skip("the benchmark times Lightning's real grad_norm", allow_module_level=True)


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
    assert set(results["versions"]) == {"torch", "gradexp", "wandb", "lightning"}
    assert list(results["cases"]) == list(overhead.TINY_CASES)
    for case, c in results["cases"].items():
        rows = c["rows"]
        assert list(rows) == list(overhead.VARIANTS)
        for variant, row in rows.items():
            assert row["ms_per_step"] > 0 and row["ratio"] > 0
            assert row["peak_rss_mb"] > 0 if case == "mlp3x16" else "peak_rss_mb" not in row  # one child each
            assert row["target"] == overhead.TARGETS["cpu"].get(variant)
            # a target is met when the ratio is at most the target
            assert row.get("met") == (row["ratio"] <= row["target"] if row["target"] is not None else None)
            # the markdown table shows the row's own numbers
            assert f"| {case} | {variant} | {row['ms_per_step']:.2f} | {row['ratio']:.3f} |" in done.stdout


def test_overhead_benchmark_interleaving_steps_gives_each_variant_its_blocks(tmp_path):
    out = tmp_path / "steps.json"
    done = subprocess.run([sys.executable, "bench/overhead.py", "--tiny", "--estimator", "steps",
                           "--cases", "mlp3x16", "--variants", "gradexp", "--no-memory", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["estimator"] == "steps" and list(results["cases"]) == ["mlp3x16"]
    rows = results["cases"]["mlp3x16"]["rows"]
    assert [v for v in rows if "gradexp" not in v] == ["bare PyTorch loop"] and len(rows) > 3
    for variant, row in rows.items():
        if variant == "bare PyTorch loop":
            assert "blocks" not in row
        else:  # the tiny mode: the median of two blocks' ratios
            assert len(row["blocks"]) == 2 and row["ratio"] == pytest.approx(sum(row["blocks"]) / 2)
            assert row["ms_per_step"] > 0
    assert "interleaved with a bare step" in done.stdout


def test_overhead_benchmark_refuses_to_interleave_steps_on_a_gpu():
    done = subprocess.run([sys.executable, "bench/overhead.py", "--estimator", "steps", "--device", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "synchronisation per step" in done.stderr


def test_startup_benchmark_times_each_command(tmp_path):
    out = tmp_path / "startup.json"
    done = subprocess.run([sys.executable, "bench/startup.py", "--repeats", "1", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert set(results["median_s"]) == {"import torch", "gradexp run"} and list(results["extra_s"]) == ["gradexp run"]
    assert all(len(t) == 1 and t[0] > 0 for t in results["wall_s"].values())
    assert "gradexp run - import torch" in done.stdout


def test_divergence_check_benchmark_times_the_check_beside_a_step(tmp_path):
    out = tmp_path / "divergence_check.json"
    done = subprocess.run([sys.executable, "bench/divergence_check.py", "--tiny", "--repeats", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert results["provenance"]["commit"] and list(results["results"]) == ["mlp3x16", "cnn2x4", "transformer2x32"]
    for name, r in results["results"].items():
        assert r["check_ms"] > 0 and r["bare_ms_per_step"] > 0 and len(r["with_over_without_all"]) == 2
        assert r["check_share_of_step"] == pytest.approx(r["check_ms"] / r["bare_ms_per_step"])
        assert f"{name:18s} step {r['bare_ms_per_step']:.2f} ms, check {r['check_ms']:.3f} ms" in done.stdout
