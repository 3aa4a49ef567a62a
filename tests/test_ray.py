"""The Ray engine: `run --engine ray` and the daemon on a pool of Ray actors, with the tiny models.

One local Ray instance (2 CPUs) serves the whole module. Actor deaths are real: the test processor
(:func:`helpers.processors.make_crashing_processor`) ends the actor's process with ``os._exit(1)``
on inputs named ``*crash-once*`` (first time only) and ``*crash-always*``. The workers import it
from ``tests/`` (on their ``PYTHONPATH``); `run` gets it through the pool options its flags make."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli.app import app
from helpers import outcome_records, time_limit, wait_for
from helpers.processors import CRASH_DIR_ENV, CRASHING

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
RAY_FLAGS = ["--engine", "ray", "--actors", "2", "--cpus-per-actor", "1"]
VOLATILE = {"created", "timings", "seconds"}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    # Workers inherit the environment the local instance starts with: the crash markers' folder,
    # tests/ on PYTHONPATH (the test processors; the repository too, as under pytest) and
    # HF_HUB_OFFLINE from conftest.
    env = {CRASH_DIR_ENV: str(tmp_path_factory.mktemp("crash-markers")),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO),
                                          *filter(None, [os.environ.get("PYTHONPATH")])])}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             object_store_memory=256 * 1024 * 1024)
    yield ray
    ray.shutdown()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def crashing_actors(monkeypatch):
    """`run --engine ray` builds its pool options from the flags; here they also name the crashing
    test processor as what each actor builds (the shipped CLI has no flag for that)."""
    import dataclasses

    import cli.run_cmd

    real = cli.run_cmd.pool_options

    def with_crashing(*args, **kwargs):
        opts = real(*args, **kwargs)
        return None if opts is None else dataclasses.replace(opts, processor_factory=CRASHING)

    monkeypatch.setattr(cli.run_cmd, "pool_options", with_crashing)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four inputs: the demo's three samples (one with EXIF rotation, one empty) and a smaller bag."""
    from pipeline.io.samples import handbag, write_samples

    d = tmp_path_factory.mktemp("ray-in")
    write_samples(d)
    handbag(320, 240).save(d / "handbag-small.png")
    return d


def run(args, tiny_dir):
    return runner.invoke(app, ["run", *args, "--config", str(tiny_dir / "settings.yaml")], terminal_width=200)


def manifest(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def stable(rec):
    """A record without what legitimately differs between two runs (times)."""
    if isinstance(rec, dict):
        return {k: stable(v) for k, v in rec.items() if k not in VOLATILE}
    if isinstance(rec, list):
        return [stable(v) for v in rec]
    return rec


def test_run_on_ray_gives_the_same_outputs_as_local(tiny_dir, ray_cluster, photos, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "ray"
    r = run([str(photos), "--out", str(local)], tiny_dir)
    assert r.exit_code == 0, r.output
    r = run([str(photos), "--out", str(remote), *RAY_FLAGS], tiny_dir)
    assert r.exit_code == 0, r.output
    assert "Ray pool: 2 actor(s)" in r.output

    def by_input(out):
        return {Path(e["input"]).name: (e["status"], e["stem"], e["sha256"], e["record"]) for e in manifest(out)}

    assert by_input(remote) == by_input(local)
    assert len(by_input(local)) == 4
    pngs = sorted(p.relative_to(local) for p in local.rglob("*.png"))
    assert pngs and pngs == sorted(p.relative_to(remote) for p in remote.rglob("*.png"))
    for rel in pngs:
        a, b = np.asarray(Image.open(local / rel)), np.asarray(Image.open(remote / rel))
        assert a.shape == b.shape and np.array_equal(a, b), rel
    records = sorted(p.relative_to(local) for p in local.rglob("*.json"))
    assert records == sorted(p.relative_to(remote) for p in remote.rglob("*.json"))
    for rel in records:
        a, b = json.loads((local / rel).read_text()), json.loads((remote / rel).read_text())
        # Identical apart from times: statuses, detections with scores and boxes, actions, and the
        # paths, which point at this machine's input and outbox, never at an actor's temp folder.
        assert stable(a) == stable(b), rel
        assert "product-studio-task-" not in (remote / rel).read_text()
    statuses = Counter(e["status"] for e in manifest(remote))
    assert statuses["edited"] >= 1


def test_run_on_ray_survives_actor_deaths_and_fails_a_poisonous_image(tiny_dir, ray_cluster, photos, tmp_path,
                                                                         crashing_actors):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    names = {"handbag.png": "a.png", "shoe-phone.jpg": "b-crash-once.jpg", "empty-wall.jpg": "c-crash-always.jpg",
             "handbag-small.png": "d.png"}
    for src, dst in names.items():
        shutil.copy(photos / src, inp / dst)
    with time_limit(150):
        r = run([str(inp), "--out", str(out), *RAY_FLAGS], tiny_dir)
    assert r.exit_code == 4, r.output  # one input failed
    entries = manifest(out)
    # Every input exactly once, each with one outcome.
    assert sorted(Path(e["input"]).name for e in entries) == sorted(names.values())
    status = {Path(e["input"]).name: e for e in entries}
    assert status["c-crash-always.jpg"]["status"] == "failed"
    assert status["c-crash-always.jpg"]["error"] == "worker process died 3 times on this image"
    rec = json.loads((out / "failed" / "c-crash-always.json").read_text())
    assert rec["status"] == "failed" and rec["attempts"] == 3 and rec["input"]["path"] == str(inp / "c-crash-always.jpg")
    # The image that killed its actor once was processed on a restarted (or the other) actor, and
    # no death was counted against an image that did not cause it.
    for name in ("a.png", "b-crash-once.jpg", "d.png"):
        assert status[name]["status"] in ("edited", "skipped"), status[name]
    for e in entries:
        assert (out / e["record"]).is_file()
    stems = [p.stem for folder in outcome_records(out).values() for p in folder]
    assert sorted(stems) == sorted(e["stem"] for e in entries)  # one record per input, no duplicates


def test_daemon_on_ray_processes_each_image_once_and_hot_reloads_rules(tiny_dir, tiny_settings, ray_cluster, photos,
                                                                        tmp_path):
    from daemon.config import DaemonSettings
    from daemon.service import Daemon
    from pipeline.engine.ray_engine import PoolOptions, RayProcessor
    from pipeline.run.rules import load_rules

    s = tiny_settings.model_copy(deep=True)
    s.base_dir = tiny_settings.base_dir
    s.source_file = tiny_settings.source_file
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    s.paths.inbox, s.paths.outbox, s.paths.ledger = inbox, outbox, outbox / ".ledger.sqlite3"
    rules = tmp_path / "rules.yaml"
    rules.write_text((tiny_dir / "rules.yaml").read_text())
    opts = PoolOptions(actors=2, cpus_per_actor=1, processor_factory=CRASHING)
    ds = DaemonSettings(settle_seconds=0.2, rescan_seconds=1.0, rules_poll_seconds=0.1, status_interval_seconds=0.2,
                        retry_backoff_seconds=0.05, stop_grace_seconds=30.0)
    d = Daemon(s, lambda: RayProcessor(s, rules, opts), ds, rules_path=rules)
    with time_limit(170):
        d.start()
        try:
            assert len(d.worker.threads) == 4  # 2 actors, 2 images in flight per actor
            (inbox / "sub").mkdir()
            drops = {"handbag.png": "a.png", "shoe-phone.jpg": "b-crash-once.jpg",
                     "empty-wall.jpg": "c-crash-always.jpg", "handbag-small.png": "sub/d.png"}
            for src, dst in drops.items():
                shutil.copy(photos / src, inbox / dst)

            def terminal():
                c = d.ledger.counts()
                return c["done"] + c["skipped"] + c["failed"] == len(drops) and c["pending"] + c["running"] == 0

            wait_for(terminal, 120, "every image to reach an outcome")
            # A rule edit reaches the actors: the next image is processed under the new rules.
            rules.write_text(rules.read_text().replace("x: 10%", "x: 5%"))
            new_hash = load_rules(rules, s).sha256
            wait_for(lambda: d.status.rules.get("hash") == new_hash, 20, "the rules reload")
            Image.open(photos / "handbag.png").rotate(180).save(inbox / "e.png")
            wait_for(lambda: d.ledger.counts()["done"] + d.ledger.counts()["skipped"] == len(drops), 60,
                     "the image dropped after the edit")
            assert d.wait_idle(20)
        finally:
            d.stop()
    rows = d.ledger.open().rows()
    d.ledger.close()
    names = [r.name for r in rows]
    assert sorted(names) == sorted([*drops.values(), "e.png"])  # each input once in the ledger
    by_name = {r.name: r for r in rows}
    poison = by_name["c-crash-always.jpg"]
    # Deaths are counted apart from attempts (pipeline.run.deaths: one policy with the daemon's isolated child).
    assert poison.state == "failed" and poison.deaths == 3 and poison.attempts == 1
    assert poison.error == "worker process died 3 times on this image"
    failed = json.loads((outbox / "failed" / f"{poison.stem}.json").read_text())
    assert failed["error"] == poison.error
    for name in ("a.png", "b-crash-once.jpg", "sub/d.png", "e.png"):
        assert by_name[name].state in ("done", "skipped"), by_name[name]
    # One record per row, in the folder of its outcome; the inputs left the inbox for the archive.
    recs = outcome_records(outbox)
    stems = sorted(p.stem for folder in recs.values() for p in folder)
    assert stems == sorted(r.stem for r in rows)
    for r in rows:
        assert r.disposition and r.disposition.startswith("archived:")
        folder = {"done": "", "skipped": "skipped", "failed": "failed"}[r.state]
        rec = json.loads((outbox / folder / f"{r.stem}.json").read_text())
        if r.name != "c-crash-always.jpg":
            assert rec["input"]["path"] == str(inbox / r.name)  # the daemon's path, not an actor's temp copy
    assert not [p for p in inbox.rglob("*") if p.is_file()]
    e = json.loads((outbox / f"{by_name['e.png'].stem}.json").read_text()) if by_name["e.png"].state == "done" else \
        json.loads((outbox / "skipped" / f"{by_name['e.png'].stem}.json").read_text())
    assert e["rules"]["sha256"] == new_hash and by_name["e.png"].rules_hash == new_hash


def test_a_model_missing_on_the_workers_stops_the_run_at_start(tiny_dir, ray_cluster, photos, tmp_path):
    import yaml

    data = yaml.safe_load((tiny_dir / "settings.yaml").read_text())
    data["root"] = str(tiny_dir)
    data["models"]["clip"]["path"] = "no-such-clip"
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(data))
    r = runner.invoke(app, ["run", str(photos), "--out", str(tmp_path / "o"), "--rules", str(tiny_dir / "rules.yaml"),
                            *RAY_FLAGS, "--config", str(cfg)], terminal_width=200)
    assert r.exit_code == 3, r.output  # the actors' warm-up failed: the model error, as locally
    assert "clip" in r.output and "no-such-clip" in r.output
    assert not (tmp_path / "o" / "manifest.jsonl").exists()


def test_pool_sizing_defaults_and_refusals():
    from pipeline.engine.ray_engine import EngineError, PoolOptions, plan_sizing

    s = plan_sizing(PoolOptions(), {"CPU": 32.0, "GPU": 4.0})
    assert (s.actors, s.gpus_per_actor, s.cpus_per_actor, s.max_in_flight) == (4, 1.0, 1.0, 8)  # one per GPU
    s = plan_sizing(PoolOptions(gpus_per_actor=0.5), {"CPU": 32.0, "GPU": 4.0})
    assert (s.actors, s.gpus_per_actor) == (8, 0.5)
    s = plan_sizing(PoolOptions(), {"CPU": 16.0})
    assert (s.actors, s.gpus_per_actor, s.cpus_per_actor, s.max_in_flight) == (4, 0.0, 4.0, 8)  # CPU actors
    s = plan_sizing(PoolOptions(), {"CPU": 2.0})
    assert (s.actors, s.cpus_per_actor) == (1, 2.0)
    s = plan_sizing(PoolOptions(actors=3, max_in_flight=5), {"CPU": 2.0})
    assert s.max_in_flight == 5 and s.notes  # more than fits now: said, not refused (autoscaling)
    with pytest.raises(EngineError, match="GPU"):
        plan_sizing(PoolOptions(gpus_per_actor=1), {"CPU": 8.0})
    with pytest.raises(EngineError, match="--actors"):
        PoolOptions(actors=0)


def test_engine_ray_without_ray_installed_is_a_clear_error(tiny_dir, photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    r = run([str(photos), "--out", str(tmp_path / "o"), "--engine", "ray"], tiny_dir)
    assert r.exit_code == 2, r.output
    assert "pip install 'product-studio[ray]'" in r.output
    (tmp_path / "inbox").mkdir()
    cfg = tmp_path / "s.yaml"
    cfg.write_text("root: .\npaths:\n  inbox: inbox\n  outbox: outbox\n")
    r = runner.invoke(app, ["watch", "--config", str(cfg), "--engine", "ray"], terminal_width=200)
    assert r.exit_code == 2, r.output
    assert "pip install 'product-studio[ray]'" in r.output
    r = run([str(photos), "--actors", "2"], tiny_dir)
    assert r.exit_code == 2 and "--engine ray" in r.output
    r = run([str(photos), "--engine", "spark"], tiny_dir)
    assert r.exit_code == 2 and "--engine" in r.output


def test_help_lists_the_engine_flags_without_importing_ray():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cli.app import app\n"
        "for cmd in ('run', 'watch'):\n"
        "    r = CliRunner().invoke(app, [cmd, '--help'], terminal_width=200)\n"
        "    assert r.exit_code == 0 and '--engine' in r.output and '--max-in-flight' in r.output, r.output\n"
        "assert 'ray' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)


def test_watch_engine_ray_as_a_process_finishes_images_in_flight_on_sigterm(tiny_dir, photos, tmp_path):
    """The real command: its own local Ray instance, a real observer. SIGTERM while one image is on
    the (single) actor and another waits for it: the first is finished, the waiting one goes back
    to the queue uncounted, exit 0 (Ray's own SIGTERM handler must not take over)."""
    import signal

    from daemon.ledger import Ledger, read_summary

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    ledger = outbox / ".ledger.sqlite3"
    log = open(tmp_path / "watch.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "cli.daemon_cmd", "watch", "--config", str(tiny_dir / "settings.yaml"),
                          "--inbox", str(inbox), "--outbox", str(outbox), "--ledger", str(ledger),
                          "--rules", str(tiny_dir / "rules.yaml"),
                          "--settle", "0.2", "--rescan", "1", "--log-format", "json", "--engine", "ray",
                          "--actors", "1", "--cpus-per-actor", "1", "--max-in-flight", "2"],
                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def counts():
        return read_summary(ledger)["counts"] if ledger.exists() else {}

    try:
        with time_limit(150):
            wait_for(lambda: '"event": "started"' in (tmp_path / "watch.log").read_text() or p.poll() is not None,
                     100, "the daemon to start")
            assert p.poll() is None, (tmp_path / "watch.log").read_text()
            assert "Ray pool: 1 actor(s)" in (tmp_path / "watch.log").read_text()
            shutil.copy(photos / "handbag.png", inbox / "a.png")
            shutil.copy(photos / "handbag-small.png", inbox / "b.png")
            wait_for(lambda: counts().get("done", 0) + counts().get("skipped", 0) == 2, 60, "both images")
            shutil.copy(photos / "shoe-phone.jpg", inbox / "c.jpg")
            shutil.copy(photos / "empty-wall.jpg", inbox / "d.jpg")
            wait_for(lambda: counts()["running"] == 2 or counts()["done"] + counts()["skipped"] == 4, 30,
                     "both new images taken")
            p.send_signal(signal.SIGTERM)
            assert p.wait(60) == 0, (tmp_path / "watch.log").read_text()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        log.close()
    c = counts()
    assert c["running"] == c["failed"] == 0
    assert c["done"] + c["skipped"] >= 3 and c["done"] + c["skipped"] + c["pending"] == 4
    rows = Ledger(ledger).open().rows()
    assert all(r.attempts == 0 for r in rows if r.state == "pending")  # requeued, not counted
