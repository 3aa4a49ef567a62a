"""`python -m bench ops` in its tiny mode (real code, tiny models), the plan of cut-and-scaled
cases at the shipped settings, and the report. Never asserts wall times."""

from __future__ import annotations

import json
import math

import pytest

from helpers import time_limit


@pytest.fixture(autouse=True)
def _limit():
    with time_limit(300):
        yield


def test_plan_at_shipped_settings_cuts_only_long_stages():
    from bench.ops import CUT, plan_case
    from pipeline.settings import Settings

    s = Settings()
    p = plan_case("enhance", "default", s)
    assert p["denoise"] == 22 and p["scaled"] == {"generate": (*CUT, 22)}  # int(30 x 0.75)
    assert [x.steps for x in p["params"]] == [2, 4] and all(x.sampler == "default" for x in p["params"])
    p = plan_case("enhance", "lcm", s)
    assert p["denoise"] == 3 and p["scaled"] == {} and p["params"][0].steps == 30  # lcm's own 4 x 0.75
    p = plan_case("displace", "default", s)
    assert p["scaled"] == {"fill": (*CUT, 30)} and not p["params"][0].fill.recheck
    assert [x.fill.steps for x in p["params"]] == list(CUT)  # strength 1.0: the steps are the denoise steps
    p = plan_case("displace", "lcm", s)
    assert p["scaled"] == {} and p["denoise"] == 4 and p["params"][0].fill.sampler == "lcm"
    p = plan_case("rotate", "lcm", s)
    assert p["scaled"] == {"novel_view": (*CUT, 75)} and p["params"][0].fill.sampler == "lcm"


def test_bench_ops_quick_tiny_runs_and_reports(tmp_path):
    from bench.__main__ import main

    assert main(["ops", "--quick", "--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "results.json").read_text())
    res = rep["benchmarks"]["ops"]
    assert set(res["cases"]) == {f"{op} {s}" for op in ("enhance", "displace", "rotate") for s in ("default", "lcm")}
    for name, c in res["cases"].items():
        assert c["runs_s"] and all(t > 0 for t in c["runs_s"]) and c["estimate_s"] > 0, name
        assert c["measures"], name
    assert res["cases"]["enhance lcm"]["scheduler"] == "LCMScheduler"
    assert res["cases"]["enhance lcm"]["acceleration"]["role"] == "lcm_lora"
    assert res["cases"]["displace default"]["acceleration"] is None
    for name in ("enhance default/lcm", "displace default/lcm"):
        r = res["ratios"][name]
        assert r["value"] > 0 and math.isfinite(r["value"]) and r["goal"] == 5.0
    md = (tmp_path / "results.md").read_text()
    assert "enhance default/lcm" in md and "shipped settings" in md
