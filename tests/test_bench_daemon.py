"""Smoke test of the daemon bookkeeping benchmark (small images; no wall-time assertions)."""

from bench.daemon import run_daemon_bench


def test_daemon_bench_runs_every_image_through_the_real_daemon():
    res = run_daemon_bench(12, (160, 120), timeout=60, log=lambda m: None)
    assert res["outcomes"] == {"edited": 12, "skipped": 0, "failed": 0}
    assert res["images_per_s"] > 0 and res["wall_s"] > 0
    assert 0.0 <= res["share_outside_pipeline"] <= 1.0
    assert set(res["goal"]) == {"images_per_s", "met"}
