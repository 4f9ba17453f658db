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


def tiny(tmp_path, *args: str) -> tuple[dict, str]:
    """bench/overhead.py in its tiny mode with `args`: its results and its printed table. The timeout
    only guards against a hang (each call takes well under a minute alone; issue 25: one call of
    every case, variant and memory child took ~190 s and failed a 300 s limit on a loaded machine)."""
    out = tmp_path / "overhead.json"
    done = subprocess.run([sys.executable, "bench/overhead.py", "--tiny", *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done.stdout


def overhead_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import overhead
    finally:
        sys.path.pop(0)
    return overhead


def assert_rows(results: dict, stdout: str, variants: list[str], memory: bool) -> None:
    overhead = overhead_module()
    assert set(results["versions"]) == {"torch", "gradexp", "wandb", "lightning"}
    for case, c in results["cases"].items():
        rows = c["rows"]
        assert list(rows) == variants
        for variant, row in rows.items():
            assert row["ms_per_step"] > 0 and row["ratio"] > 0
            assert (row["peak_rss_mb"] > 0) if memory else "peak_rss_mb" not in row  # one child each
            assert row["target"] == overhead.TARGETS["cpu"].get(variant)
            # a target is met when the ratio is at most the target
            assert row.get("met") == (row["ratio"] <= row["target"] if row["target"] is not None else None)
            # the markdown table shows the row's own numbers
            assert f"| {case} | {variant} | {row['ms_per_step']:.2f} | {row['ratio']:.3f} |" in stdout


def test_overhead_benchmark_tiny_mode_produces_every_row_of_every_case(tmp_path):
    """Every case with every variant but wandb's (their own test: wandb's service takes seconds a run)."""
    overhead = overhead_module()
    variants = [v for v in overhead.VARIANTS if "wandb" not in v]
    results, stdout = tiny(tmp_path, "--no-memory", "--variants", *[v for v in variants if v != overhead.BARE])
    assert list(results["cases"]) == list(overhead.TINY_CASES)
    assert_rows(results, stdout, variants, memory=False)


def test_overhead_benchmark_times_the_real_wandb_watch(tmp_path):
    overhead = overhead_module()
    variants = [overhead.BARE] + [v for v in overhead.VARIANTS if "wandb" in v]
    results, stdout = tiny(tmp_path, "--cases", "mlp3x16", "--no-memory", "--variants", "wandb")
    assert_rows(results, stdout, variants, memory=False)


def test_overhead_benchmark_measures_peak_memory_in_a_child_per_variant(tmp_path):
    overhead = overhead_module()
    probes_off = next(v for v in overhead.VARIANTS if "probes off" in v)
    results, stdout = tiny(tmp_path, "--cases", "mlp3x16", "--variants", probes_off)
    assert_rows(results, stdout, [overhead.BARE, probes_off], memory=True)


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
