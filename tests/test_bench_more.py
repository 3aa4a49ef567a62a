"""Smoke tests for the warm-vs-cold, daemon and dtype benchmarks and the report, at tiny sizes.
Never asserts wall times (they belong to the machine, not the code)."""

from __future__ import annotations

import argparse
import io
import json
import math

import pytest

from helpers import time_limit


@pytest.fixture(autouse=True)
def _limit():
    with time_limit(180):
        yield


def _opts(**kw) -> argparse.Namespace:
    base = dict(tiny=True, quick=False, size=None, device="cpu", repeats=1, images=None)
    return argparse.Namespace(**{**base, **kw})


def _check_cases(res):
    for name, case in res["cases"].items():
        assert case["runs_s"] and all(t > 0 for t in case["runs_s"]), name
        assert case["min_s"] <= case["median_s"] <= case["max_s"], name
        assert case["measures"], name
    for name, r in res["ratios"].items():
        assert r["value"] > 0 and math.isfinite(r["value"]), name
        assert (r["met"] is None) == (r["goal"] is None), name
    assert res["context"]["notes"]
    json.dumps(res)


@pytest.fixture(scope="module")
def warm_result():
    from bench.warm import run_warm

    # 3 skip images, 2 of them run cold: the cold total is 3 x their median.
    return run_warm(n={"product": 2, "skip": 3}, cold_runs=2, tiny=True, size=(96, 64))


def test_warm_cases_ratio_and_context(warm_result):
    res = warm_result
    assert res["benchmark"] == "warm"
    _check_cases(res)
    assert set(res["cases"]) == {"product_warm", "product_cold", "skip_warm", "skip_cold"}
    pw, pc = res["cases"]["product_warm"], res["cases"]["product_cold"]
    assert pw["processes"] == 1 and pc["processes"] == 2 and len(pc["runs_s"]) == 2
    # The forced product path ran in every process, for every image, with detections.
    assert len(pw["detect_s_per_image"]) == 2 and len(pc["detect_s_per_image"]) == 2
    assert all(n > 0 for n in pw["detections"] + pc["detections"])
    sw, sc = res["cases"]["skip_warm"], res["cases"]["skip_cold"]
    assert len(sw["detect_s_per_image"]) == 3 and sw["detections"] == [0, 0, 0]
    assert sc["processes"] == 3 and sc["cold_processes_measured"] == 2 and len(sc["runs_s"]) == 2
    assert sc["wall_s"] == pytest.approx(3 * sc["median_s"])
    assert "median of 2 measured" in sc["measures"]
    for kind in ("product", "skip"):
        r = res["ratios"][f"cold/warm ({kind})"]
        assert r["goal"] == 10.0 and isinstance(r["met"], bool)
        assert math.isfinite(res["kinds"][kind]["startup_overhead_per_image_s"])
    assert res["context"]["images"] == {"product": 2, "skip": 3}
    assert all(c["peak_rss_mib"] > 0 for c in res["cases"].values())


def test_warm_render(warm_result):
    from rich.console import Console

    from bench.warm import render

    out = io.StringIO()
    render(warm_result, Console(file=out, width=200))
    text = out.getvalue()
    assert "cold/warm, product images" in text and "skip_cold" in text and "start-up costs" in text


def test_daemon_bench_from_options():
    from bench.daemon import run_from_options

    res = run_from_options(_opts(images=20, size=(160, 120), repeats=2))
    assert res["benchmark"] == "daemon"
    _check_cases(res)
    case = res["cases"]["daemon_passthrough"]
    assert case["outcomes"] == {"edited": 20, "skipped": 0, "failed": 0}
    assert len(case["runs_s"]) == 2 and len(case["runs_images_per_s"]) == 2
    assert case["min_images_per_s"] <= case["median_images_per_s"] <= case["max_images_per_s"]
    assert 0.0 <= case["share_outside_pipeline"] <= 1.0 and case["peak_rss_mib"] > 0
    assert {"images_per_s/goal", "bookkeeping_images_per_s/goal"} == set(res["ratios"])
    assert [r["pipeline_calls"] for r in res["runs"]] == [20, 20]


def test_dtype_bench_clip(monkeypatch):
    import torch

    import bench.dtype as bd

    dev = torch.device("cpu")
    ok, why = bd.bf16_support(dev)
    res = bd.run_dtype(repeats=1, device="cpu", networks=("clip",))
    assert res["context"]["bf16_native"] is ok
    if not ok:
        assert res["cases"] == {} and why in res["context"]["notes"][0]
        return
    _check_cases(res)
    assert set(res["cases"]) == {"clip_fp32", "clip_bf16"} and "clip fp32/bf16" in res["ratios"]
    # Without native bf16 the benchmark refuses rather than timing an emulation.
    monkeypatch.setattr("pipeline.models.registry.cpu_native_bf16", lambda: False)
    assert bd.bf16_support(dev)[0] is False


def test_benchmarks_registered():
    from bench import BENCHMARKS

    assert set(BENCHMARKS) == {"detect", "enhance", "warm", "daemon", "dtype", "large", "fill", "ops"}
    for target in BENCHMARKS.values():
        module, func = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func))


def test_peak_memory_sees_an_allocation():
    import mmap

    from bench.measure import PeakMemory

    pm = PeakMemory()
    with pm:
        # 64 MiB of fresh anonymous pages, touched (malloc might reuse memory it already holds).
        block = mmap.mmap(-1, 64 * 2 ** 20)
        block.write(b"\x01" * len(block))
        block.close()
    rec = pm.record()
    assert rec["peak_rss_mib"] > 0
    if rec["memory_scope"] == "case":
        assert rec["rise_rss_mib"] >= 48, rec  # the block, give or take what the allocator reused


def test_report_markdown_and_docs(tmp_path):
    from bench.report import DOCS_BEGIN, DOCS_END, build_report, to_markdown, update_docs, write_outputs

    res = {"benchmark": "x", "cases": {"a": {"runs_s": [1.0, 3.0, 2.0], "min_s": 1.0, "median_s": 2.0, "max_s": 3.0,
                                             "measures": "a | b", "peak_rss_mib": 10.0, "rise_rss_mib": 2.0}},
           "ratios": {"b/a": {"value": 4.0, "goal": 3.0, "met": True}}, "context": {"notes": ["note one"]}}
    report = build_report({"x": res}, mode="quick", argv=["x", "--quick"])
    assert report["packages"]["torch"] and report["machine"]["cpu_count"] >= 1
    md = to_markdown(report)
    assert "| x | b/a | 4.00x | >= 3 | yes |" in md
    assert "| x | a | 3 | 1 | 2 | 3 | 10 (+2) | - | a \\| b |" in md
    assert "- **x**: note one" in md and "python -m bench x --quick" in md
    j, m = write_outputs(report, tmp_path / "out")
    assert json.loads(j.read_text())["benchmarks"]["x"]["ratios"]["b/a"]["value"] == 4.0
    assert m.read_text() == md
    doc = tmp_path / "perf.md"
    doc.write_text(f"# Perf\n\nprose\n\n{DOCS_BEGIN}\nold\n{DOCS_END}\n\nmore prose\n")
    update_docs(report, doc)
    text = doc.read_text()
    assert "old" not in text and "prose" in text and "more prose" in text and "| x | b/a |" in text
    with pytest.raises(ValueError, match="no generated block"):
        update_docs(report, doc, "gpu")


def test_rounds_interleave_and_run_a_slow_case_once():
    from bench.measure import Rounds

    calls = []
    cost = {"a": 1.0, "b": 100.0}

    def run(case, warmup):
        calls.append((case, warmup))
        return cost[case], {"case": case}

    r = Rounds(("a", "b"), run, repeats=2, slow="b", slow_s=60.0)
    assert calls == [("a", True), ("b", True), ("a", False), ("a", False)]
    assert r.times == {"a": [1.0, 1.0], "b": [100.0]} and "b ran once" in r.note
    calls.clear()
    cost["b"] = 2.0
    r = Rounds(("a", "b"), run, repeats=2, slow="b", slow_s=60.0)
    assert calls == [("a", True), ("b", True), ("a", False), ("b", False), ("a", False), ("b", False)]
    assert r.times["b"] == [2.0, 2.0] and r.note == "b: median of 2 run(s) after a warm-up"
    calls.clear()
    r = Rounds(("a", "b"), run, repeats=1, warm=())
    assert calls == [("a", False), ("b", False)] and r.warmups == {}
