"""Smoke tests for the warm-vs-cold and daemon benchmarks at tiny sizes. Never asserts wall times."""

from __future__ import annotations

import argparse
import io
import json
import math

import pytest

from daemon.testing import time_limit


@pytest.fixture(autouse=True)
def _limit():
    with time_limit(120):
        yield


def _opts(**kw) -> argparse.Namespace:
    base = dict(tiny=True, size=None, device="cpu", repeats=1, images=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture(scope="module")
def warm_result():
    from bench.warm import run_warm

    return run_warm(n=2, tiny=True, size=(96, 64))


def test_warm_cases_ratio_and_context(warm_result):
    res = warm_result
    assert res["benchmark"] == "warm"
    warm, cold = res["cases"]["warm"], res["cases"]["cold"]
    assert warm["processes"] == 1 and cold["processes"] == 2
    assert warm["wall_s"] > 0 and cold["wall_s"] > 0 and len(cold["runs_s"]) == 2
    assert all(t > 0 for t in cold["runs_s"])
    # The forced product path ran in every process, for every image.
    assert len(warm["detect_s_per_image"]) == len(cold["detect_s_per_image"]) == 2
    assert all(t > 0 for t in warm["detect_s_per_image"] + cold["detect_s_per_image"])
    assert all(n > 0 for n in warm["detections"] + cold["detections"])
    r = res["ratios"]["cold/warm"]
    assert r["value"] > 0 and math.isfinite(r["value"]) and r["goal"] == 10.0 and isinstance(r["met"], bool)
    assert math.isfinite(res["startup_overhead_per_image_s"])
    ctx = res["context"]
    assert ctx["images"] == 2 and ctx["image_size"] == [96, 64]
    assert all(v > 0 for v in ctx["peak_rss_mib"].values())
    json.dumps(res)


def test_warm_render(warm_result):
    from rich.console import Console

    from bench.warm import render

    out = io.StringIO()
    render(warm_result, Console(file=out, width=200))
    assert "cold/warm" in out.getvalue() and "start-up overhead per image" in out.getvalue()


def test_daemon_bench_from_options():
    from bench.daemon import run_from_options

    res = run_from_options(_opts(images=20, size=(160, 120)))
    assert res["images"] == 20 and res["outcomes"] == {"edited": 20, "skipped": 0, "failed": 0}
    assert res["pipeline_calls"] == 20 and res["pipeline_s"] > 0
    assert res["images_per_s"] > 0 and res["bookkeeping_images_per_s"] > 0 and res["wall_s"] > 0
    assert 0.0 <= res["share_outside_pipeline"] <= 1.0
    assert {"images_per_s/goal", "bookkeeping_images_per_s/goal"} <= set(res["ratios"])
    assert res["peak_rss_mib"] > 0
    json.dumps(res)


def test_benchmarks_registered():
    from bench import BENCHMARKS

    assert BENCHMARKS["warm"] == "bench.warm:run_from_options"
    assert BENCHMARKS["daemon"] == "bench.daemon:run_from_options"


def test_images_option_is_pulled_out():
    import bench.daemon

    before = list(bench.daemon.IMAGES_OVERRIDE)
    try:
        assert bench.daemon.with_images(["--tiny", "--images", "7"]) == ["--tiny"]
        assert bench.daemon.IMAGES_OVERRIDE[-1] == 7
    finally:
        bench.daemon.IMAGES_OVERRIDE[:] = before
