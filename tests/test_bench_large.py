"""Smoke test for ``python -m bench large --quick`` on the tiny models: both photos detected in a
fresh child process through the product's loader, memory and time compared, the report written.
Never asserts wall times (they belong to the machine, not the code)."""

from __future__ import annotations

import json
import math


def test_large_quick_runs_and_reports(tmp_path, monkeypatch):
    from bench.__main__ import main
    from bench.large import CASES, MEMORY_GOAL_MIB, TIME_GOAL

    monkeypatch.setenv("PRODUCT_STUDIO_MALLOC", "stock")  # --stock-malloc sets it; undone after the test
    # A 7.7 MP "large" photo keeps the smoke run short; the benchmark's default is 8000x6000.
    assert main(["large", "--tiny", "--quick", "--size", "3200x2400", "--out", str(tmp_path / "res"),
                 "--stock-malloc"]) == 0
    data = json.loads((tmp_path / "res" / "results.json").read_text())
    res = data["benchmarks"]["large"]
    assert set(res["cases"]) == set(CASES)
    for name, case in res["cases"].items():
        assert len(case["runs_s"]) == 1 and case["runs_s"][0] > 0, name  # --quick: one timed round
        assert case["detections"] > 0 and case["proposals"] > 0, name
        assert case["first_run"]["peak_rss_mib"] > 0 and case["cpu_median_s"] > 0, name
    assert "8000x6000" not in res["cases"]["photo_48mp"]["measures"]
    assert "3200x2400" in res["cases"]["photo_48mp"]["measures"]
    ratios = res["ratios"]
    assert ratios["48mp/1mp time"]["goal"] == TIME_GOAL and ratios["48mp/1mp time"]["goal_op"] == "<="
    mem = ratios["48mp-1mp peak rss/goal"]
    assert mem["goal_op"] == "<=" and isinstance(mem["met"], bool)
    extra = res["context"]["extra_peak_rss_mib"]
    assert math.isfinite(extra) and mem["value"] == extra / MEMORY_GOAL_MIB
    assert res["context"]["max_pixels"] >= 48_000_000 and res["context"]["notes"]
    md = (tmp_path / "res" / "results.md").read_text()
    assert "| large |" in md and "<= 1.5" in md
