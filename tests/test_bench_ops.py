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
    from bench.ops import MEASURED_STEPS, plan_case
    from pipeline.settings import Settings

    s = Settings()
    n = MEASURED_STEPS
    p = plan_case("enhance", "default", s)
    assert p["denoise"] == 22 and p["scaled"] == {"generate": (n, 22)}  # int(30 x 0.75)
    assert p["params"].steps == 3 and p["params"].sampler == "default"  # int(3 x 0.75) = 2 steps run
    p = plan_case("enhance", "lcm", s)
    assert p["denoise"] == 3 and p["scaled"] == {} and p["params"].steps == 30  # lcm's own 4 x 0.75
    p = plan_case("displace", "default", s)
    assert p["scaled"] == {"fill": (n, 30)} and not p["params"].fill.recheck and p["params"].fill.steps == n
    p = plan_case("displace", "lcm", s)
    assert p["scaled"] == {} and p["denoise"] == 4 and p["params"].fill.sampler == "lcm"
    p = plan_case("rotate", "lcm", s)
    assert p["scaled"] == {"novel_view": (n, 75)} and p["params"].fill.sampler == "lcm" and p["params"].steps == n
    p = plan_case("rotate", "default", s)
    assert p["scaled"] == {"novel_view": (n, 75), "fill": (n, 30)}


def test_step_clock_times_each_unet_call():
    import torch

    from bench.ops import StepClock

    lin = torch.nn.Linear(2, 2)
    with StepClock({"a": lin}) as clock:
        for _ in range(3):
            lin(torch.zeros(1, 2))
    assert len(clock.times["a"]) == 3 and clock.per_step("a") >= 0
    lin(torch.zeros(1, 2))  # hooks removed on exit
    assert len(clock.times["a"]) == 3
    with StepClock({"b": lin}) as one:
        lin(torch.zeros(1, 2))
    assert one.per_step("b") is None


def test_bench_ops_quick_tiny_runs_and_reports(tmp_path):
    from bench.__main__ import main

    assert main(["ops", "--quick", "--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "results.json").read_text())
    res = rep["benchmarks"]["ops"]
    assert set(res["cases"]) == {f"{op} {s}" for op in ("enhance", "displace", "rotate") for s in ("default", "lcm")}
    for name, c in res["cases"].items():
        assert c["runs_s"] and all(t > 0 for t in c["runs_s"]) and c["estimate_s"] > 0, name
        assert c["measures"], name
        assert c["dtype"] == "float32", name  # the tiny set's runtime.dtype
    scaled = [(name, sc) for name, c in res["cases"].items() for sc in c["scaled"].values()]
    assert scaled  # the tiny set's stages longer than MEASURED_STEPS
    for name, sc in scaled:
        assert sc["measured_steps"] == 2 and sc["per_step_s"] > 0 and sc["shipped_steps"] > 2, name
        assert sc["per_step_cpu_s"] >= 0, name
    for name, c in res["cases"].items():
        assert c["cpu_s"] > 0 and c["estimate_cpu_s"] >= c["cpu_s"], name
    assert res["cases"]["enhance lcm"]["scheduler"] == "LCMScheduler"
    assert res["cases"]["enhance lcm"]["acceleration"]["role"] == "lcm_lora"
    assert res["cases"]["displace default"]["acceleration"] is None
    for name in ("enhance default/lcm", "displace default/lcm"):
        r = res["ratios"][name]
        assert r["value"] > 0 and math.isfinite(r["value"]) and r["goal"] == 5.0
    md = (tmp_path / "results.md").read_text()
    assert "enhance default/lcm" in md and "shipped settings" in md
