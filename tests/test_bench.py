"""Smoke tests for the benchmark harness on the tiny model set: every case runs its forced path and
the result is complete. Never asserts wall times (they belong to the machine, not the code)."""

import io
import json
import math

import pytest

from bench.detect import CASES, parse_size, render, run_detect


@pytest.fixture(scope="module")
def result(tiny_dir):
    # Small image and a 4x4 baseline grid keep the smoke run to a few seconds.
    return run_detect(tiny_dir=tiny_dir, repeats=1, size=(96, 64), device="cpu", points_per_side=4)


def test_every_case_is_timed(result):
    assert set(result["cases"]) == set(CASES)
    for name, case in result["cases"].items():
        assert case["median_s"] > 0, name
        assert case["runs_s"] and all(t > 0 for t in case["runs_s"]), name
        assert case["measures"], name


def test_forced_paths_happened(result):
    cases = result["cases"]
    skip = cases["ours_skip"]
    assert skip["skipped"] and "prefilter" in skip["reason"]
    assert "sam_embedding" not in skip["timings"]

    prod = cases["ours_product"]
    assert prod["prompts"] > 0 and prod["proposals"] > 0 and prod["crops"] > 0 and prod["detections"] > 0
    assert {"prefilter", "sam_embedding", "proposals", "classify"} <= set(prod["timings"])

    base = cases["baseline"]
    assert base["prompts"] == 16 and base["masks"] > 0 and base["crops"] == base["masks"]

    floor = cases["floor"]
    assert (floor["prompts"], floor["crops"]) == (prod["prompts"], prod["crops"])


def test_ratios_and_context(result):
    ratios = result["ratios"]
    assert {"baseline/ours_skip", "baseline/ours_product", "ours_product/floor"} <= set(ratios)
    for name, r in ratios.items():
        assert r["value"] > 0 and math.isfinite(r["value"]), name
        assert (r["met"] is None) == (r["goal"] is None), name
    ctx = result["context"]
    assert ctx["device"] == "cpu" and ctx["image_size"] == [96, 64] and ctx["torch_threads"] >= 1
    assert ctx["peak_rss_mib"] > 0
    json.dumps(result)  # what --json writes


def test_render_prints_the_tables(result):
    from rich.console import Console

    out = io.StringIO()
    render(result, Console(file=out, width=200))
    text = out.getvalue()
    assert "baseline/ours_skip" in text and "ours_product/floor" in text


def test_size_parsing():
    assert parse_size("1024x768") == (1024, 768)
    for bad in ("1024", "axb", "8x8"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_cli_writes_json(tmp_path, monkeypatch):
    from bench.__main__ import main

    monkeypatch.setenv("PRODUCT_STUDIO_MALLOC", "stock")  # what --stock-malloc sets; undone after the test
    out = tmp_path / "bench.json"
    # --stock-malloc: the steady allocator is process-wide and this process is pytest's.
    assert main(["detect", "--tiny", "--repeats", "1", "--size", "64x48", "--json", str(out),
                 "--out", str(tmp_path / "res"), "--stock-malloc"]) == 0
    data = json.loads(out.read_text())
    assert set(data["benchmarks"]["detect"]["cases"]) == set(CASES)
    assert data["mode"] == "tiny" and data["machine"]["cpu_count"] >= 1 and data["packages"]["diffusers"]
    assert json.loads((tmp_path / "res" / "results.json").read_text()) == data
    md = (tmp_path / "res" / "results.md").read_text()
    assert "| detect | baseline/ours_skip |" in md and "| detect | ours_product |" in md


def test_cli_quick_and_docs(tmp_path, monkeypatch):
    import bench.__main__ as bm
    from bench.report import DOCS_BEGIN, DOCS_END

    monkeypatch.setenv("PRODUCT_STUDIO_MALLOC", "stock")
    doc = tmp_path / "performance.md"
    doc.write_text(f"# Performance\n\n{DOCS_BEGIN}\nstale figures\n{DOCS_END}\n")
    monkeypatch.setattr(bm, "DOCS", doc)
    assert bm.main(["detect", "--tiny", "--quick", "--size", "64x48", "--out", str(tmp_path / "res"),
                    "--docs", "--stock-malloc"]) == 0
    data = json.loads((tmp_path / "res" / "results.json").read_text())
    det = data["benchmarks"]["detect"]
    # --quick: one timed run per case (the baseline and the floor without a warm-up).
    assert all(len(c["runs_s"]) == 1 for c in det["cases"].values())
    assert "quick mode" in det["context"]["baseline_note"]
    text = doc.read_text()
    assert "stale figures" not in text and "| detect | baseline/ours_skip |" in text and "--quick" in text
    # A missing section is an error (exit 2), not a silent no-op.
    assert bm.main(["detect", "--tiny", "--quick", "--size", "64x48", "--out", str(tmp_path / "res"),
                    "--docs", "gpu", "--stock-malloc"]) == 2


def test_front_case_selection():
    from bench.detect import front_case_models, select_front_cases

    assert select_front_cases(None) is None and select_front_cases("none") == []
    assert select_front_cases("guided+edgetam, guided+sam2.1-tiny") == ["guided+edgetam", "guided+sam2.1-tiny"]
    with pytest.raises(ValueError, match="guided\\+nothing"):
        select_front_cases("guided+nothing")
    # only the models the chosen cases use are built (SAM 3 at full size takes minutes)
    assert front_case_models(["guided+edgetam"]) == {"edgetam"}
    assert front_case_models(["clipseg+sam2.1-tiny"]) == {"sam2.1-tiny", "clipseg-rd64"}


def test_only_the_chosen_front_cases_run(tiny_dir):
    pytest.importorskip("timm")
    cases = ["guided+edgetam", "guided+sam2.1-tiny"]
    r = run_detect(tiny_dir=tiny_dir, repeats=1, size=(96, 64), device="cpu", points_per_side=4,
                   front_cases=cases, front_warm=False)
    assert set(r["front_ends"]) == set(cases)  # in the table's order
    for name in cases:
        c = r["front_ends"][name]
        assert "error" not in c, c.get("error")
        assert c["path"] == "product" and c["median_s"] > 0 and c["detections"] > 0
        assert c["timings"]["sam_embedding"] > 0
        assert f"ours_product/{name}" in r["ratios"]
