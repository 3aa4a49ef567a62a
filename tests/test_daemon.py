"""The inbox daemon in-process: a real watchdog observer on temp folders, a pass-through processor.

Every test runs under a time limit (SIGALRM) and every wait is bounded, so a hung thread fails the
test instead of hanging the suite."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from daemon.config import DaemonConfigError, DaemonSettings
from daemon.ledger import Ledger
from daemon.lock import DaemonLockedError
from daemon.outbox import make_stem_base
from daemon.service import Daemon
from helpers import outcome_records, png_bytes, time_limit, wait_for
from helpers.processors import PassThroughProcessor
from pipeline import PIPELINE_VERSION
from pipeline.settings import Settings

FAST = dict(settle_seconds=0.2, rescan_seconds=1.0, rules_poll_seconds=0.1, status_interval_seconds=0.2,
            retry_backoff_seconds=0.05, stop_grace_seconds=10.0)


@pytest.fixture(autouse=True)
def _time_limit():
    with time_limit(60):
        yield


class Env:
    def __init__(self, root: Path):
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.inbox.mkdir()
        self.settings = Settings()
        self.settings.base_dir = root
        self.processors: list[PassThroughProcessor] = []
        self.daemons: list[Daemon] = []

    def daemon(self, processor_kw: dict | None = None, rules: Path | None = None, **ds) -> Daemon:
        def factory():
            p = PassThroughProcessor(self.settings, rules, **(processor_kw or {}))
            self.processors.append(p)
            return p

        child = functools.partial(PassThroughProcessor, self.settings, **(processor_kw or {}))
        d = Daemon(self.settings, factory, DaemonSettings(**{**FAST, **ds}), rules_path=rules, child_factory=child)
        self.daemons.append(d)
        return d

    @contextlib.contextmanager
    def running(self, **kw):
        d = self.daemon(**kw)
        d.start()
        try:
            yield d
        finally:
            stop(d)

    def records(self) -> dict[str, list[str]]:
        return {k: [p.stem for p in v] for k, v in outcome_records(self.outbox).items()}

    def n_records(self) -> int:
        return sum(len(v) for v in outcome_records(self.outbox).values())

    def inbox_files(self) -> list[str]:
        return sorted(p.relative_to(self.inbox).as_posix() for p in self.inbox.rglob("*") if not p.is_dir())

    def rows(self):
        led = Ledger(self.outbox / ".ledger.sqlite3").open()
        try:
            return led.rows()
        finally:
            led.close()


def stop(d: Daemon, grace: float | None = None) -> bool:
    clean = d.stop(grace)
    # A thread that outlives stop() is exactly the hang these tests exist to catch.
    assert not (d._intake_thread and d._intake_thread.is_alive()), "intake thread still alive after stop"
    if clean:
        assert not d.worker.thread.is_alive(), "worker thread still alive after stop"
    return clean


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    for d in e.daemons:
        d.stop(grace=1.0)


# ------------------------------------------------------------------------------------------------
# intake


def test_burst_of_200_files(env):
    with env.running() as d:
        for i in range(200):
            (env.inbox / f"img{i:03d}.png").write_bytes(png_bytes(i))
        wait_for(lambda: env.n_records() == 200, 40, "200 records")
        assert d.wait_idle(10)
        counts = d.ledger.counts()
    assert counts["done"] == 200 and counts["pending"] == counts["running"] == counts["failed"] == 0
    assert sorted(env.records()["edited"]) == [f"img{i:03d}" for i in range(200)]
    calls = env.processors[0].calls
    assert len(calls) == 200 and len(set(calls)) == 200
    assert env.inbox_files() == [] and len(list((env.outbox / "archive").iterdir())) == 200


def test_files_and_a_directory_moved_in(env, tmp_path):
    staging = tmp_path / "staging"
    (staging / "shoot" / "deeper").mkdir(parents=True)
    (staging / "loose.png").write_bytes(png_bytes(1))
    (staging / "shoot" / "a.png").write_bytes(png_bytes(2))
    (staging / "shoot" / "deeper" / "b.jpg").write_bytes(_jpeg(3))
    (staging / "shoot" / ".DS_Store").write_bytes(b"junk")
    with env.running() as d:
        os.rename(staging / "loose.png", env.inbox / "loose.png")
        os.rename(staging / "shoot", env.inbox / "shoot")
        wait_for(lambda: env.n_records() == 3, 10, "three records")
        assert d.wait_idle(5)
    assert sorted(env.records()["edited"]) == ["loose", "shoot-a", "shoot-deeper-b"]
    assert (env.outbox / "archive" / "shoot" / "deeper" / "b.jpg").read_bytes() == _jpeg(3)
    assert env.inbox_files() == ["shoot/.DS_Store"]  # junk is never taken, never moved


def test_same_content_twice_is_a_duplicate_not_reprocessed(env):
    with env.running() as d:
        (env.inbox / "a.png").write_bytes(png_bytes(1))
        wait_for(lambda: env.n_records() == 1, 10, "first record")
        (env.inbox / "copy-of-a.png").write_bytes(png_bytes(1))
        wait_for(lambda: d.ledger.counts()["duplicates"] == 1, 10, "the duplicate")
        # ... and while the first copy is still queued, too:
        (env.inbox / "b.png").write_bytes(png_bytes(2))
        (env.inbox / "b2.png").write_bytes(png_bytes(2))
        assert d.wait_idle(10)
        counts = d.ledger.counts()
    assert counts["done"] == 2 and counts["duplicates"] == 2
    edited = sorted(env.records()["edited"])
    assert edited in (["a", "b"], ["a", "b2"])  # whichever copy of b settled first
    assert sorted(env.processors[0].calls) == [f"{s}.png" for s in edited]
    assert (env.outbox / "archive" / "copy-of-a.png").exists() and env.inbox_files() == []


def test_duplicates_reprocess_policy(env):
    with env.running(duplicates="reprocess") as d:
        (env.inbox / "a.png").write_bytes(png_bytes(1))
        wait_for(lambda: env.n_records() == 1, 10, "first record")
        (env.inbox / "again.png").write_bytes(png_bytes(1))
        wait_for(lambda: env.n_records() == 2, 10, "second record")
        assert d.wait_idle(5)
    assert sorted(env.records()["edited"]) == ["a", "again"]


def test_same_name_new_content_gets_its_own_stem(env):
    with env.running() as d:
        (env.inbox / "IMG_0001.png").write_bytes(png_bytes(1))
        wait_for(lambda: env.n_records() == 1, 10, "first record")
        wait_for(lambda: env.inbox_files() == [], 5, "first archived")
        (env.inbox / "IMG_0001.png").write_bytes(png_bytes(2))
        wait_for(lambda: env.n_records() == 2, 10, "second record")
        assert d.wait_idle(5)
    rows = env.rows()
    assert rows[0].stem == "IMG_0001" and rows[1].stem == f"IMG_0001-{rows[1].sha256[:8]}"
    archived = sorted(p.name for p in (env.outbox / "archive").iterdir())
    assert set(archived) == {"IMG_0001.png", f"IMG_0001-{rows[1].sha256[:8]}.png"}


def test_junk_partials_symlinks_and_special_files_are_not_taken(env, tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(9))
    with env.running() as d:
        for name in (".DS_Store", "._real.png", "a.png.part", "b.png.crdownload", "c.png~", ".hidden.png",
                     "Thumbs.db", "~$sheet.png"):
            (env.inbox / name).write_bytes(png_bytes(1))
        (env.inbox / "link.png").symlink_to(outside)
        os.mkfifo(env.inbox / "pipe.png")
        (env.inbox / "notes.txt").write_text("not an image")
        (env.inbox / "real.png").write_bytes(png_bytes(2))
        wait_for(lambda: env.records()["edited"] == ["real"], 20, "the real image")
        # Every other file was classified as left alone (listed, never a candidate): the timing of
        # that is tested on an injected clock in test_daemon_parts.
        wait_for(lambda: len(d.intake.ignored_list()) == 11, 20, "the eleven other files listed as ignored")
        assert d.wait_idle(10)
    assert env.records()["edited"] == ["real"] and env.processors[0].calls == ["real.png"]
    assert "real.png" not in env.inbox_files() and "link.png" in env.inbox_files() and outside.exists()


def test_non_images_can_be_failed_instead_of_ignored(env):
    with env.running(non_images="fail") as d:
        (env.inbox / "notes.txt").write_text("not an image")
        wait_for(lambda: env.records()["failed"] == ["notes"], 10, "failed record for notes.txt")
        assert d.wait_idle(5)


def test_corrupt_and_non_image_files_fail_and_the_daemon_keeps_going(env):
    good = _jpeg(1)
    with env.running() as d:
        (env.inbox / "truncated.jpg").write_bytes(good[: len(good) // 2])
        (env.inbox / "not-an-image.png").write_text("hello, I am text")
        (env.inbox / "empty.png").write_bytes(b"")
        (env.inbox / "perm.png").write_bytes(png_bytes(3))  # the processor raises a permanent error
        wait_for(lambda: len(env.records()["failed"]) == 4, 10, "four failed records")
        (env.inbox / "good.jpg").write_bytes(good)
        wait_for(lambda: env.records()["edited"] == ["good"], 10, "the good image after the bad ones")
        assert d.wait_idle(5)
        assert d.worker.thread.is_alive() and d.observer.current.is_alive()
    failed = {p.stem: json.loads(p.read_text()) for p in outcome_records(env.outbox)["failed"]}
    assert set(failed) == {"truncated", "not-an-image", "empty", "perm"}
    assert "truncated or corrupt" in failed["truncated"]["error"]
    assert "empty file" in failed["empty"]["error"]
    assert "bad parameter" in failed["perm"]["error"] and failed["perm"]["attempts"] == 1
    assert all(r["status"] == "failed" for r in failed.values())
    assert {r.name: r.state for r in env.rows()}["perm.png"] == "failed"
    # failed inputs are archived (kept), not deleted and not left to be retried forever
    assert (env.outbox / "archive" / "truncated.jpg").exists() and env.inbox_files() == []


def test_transient_errors_are_retried_with_backoff_then_failed(env):
    with env.running(max_attempts=3) as d:
        (env.inbox / "flaky.png").write_bytes(png_bytes(1))
        (env.inbox / "boom.png").write_bytes(png_bytes(2))
        wait_for(lambda: env.n_records() == 2, 10, "two records")
        assert d.wait_idle(5)
    rows = {r.name: r for r in env.rows()}
    assert rows["flaky.png"].state == "done" and rows["flaky.png"].attempts == 2
    assert rows["boom.png"].state == "failed" and rows["boom.png"].attempts == 3
    rec = json.loads((env.outbox / "failed" / "boom.json").read_text())
    assert rec["error"].startswith("internal error after 3 attempts: RuntimeError: boom") and rec["attempts"] == 3
    assert rec["error_type"] == "RuntimeError" and rec["stage"] == "internal"
    assert env.records()["edited"] == ["flaky"]


def test_a_failed_input_dropped_again_is_retried(env):
    with env.running(max_attempts=1) as d:
        (env.inbox / "flaky.png").write_bytes(png_bytes(1))  # fails its first (and only) attempt
        wait_for(lambda: env.records()["failed"] == ["flaky"], 10, "failed record")
        wait_for(lambda: env.inbox_files() == [], 5, "archived")
        (env.inbox / "flaky.png").write_bytes(png_bytes(1))
        wait_for(lambda: env.records()["edited"] == ["flaky"], 10, "edited on the retry")
        assert d.wait_idle(5)
    assert env.records() == {"edited": ["flaky"], "skipped": [], "failed": []}  # stale failure removed
    (row,) = env.rows()
    assert row.state == "done"


def test_observer_survives_exceptions_in_the_event_handler(env, caplog):
    with env.running(rescan_seconds=60) as d:
        real_notify = d.intake.notify
        calls = {"n": 0}

        def flaky_notify(path):
            calls["n"] += 1
            if calls["n"] <= 2:
                raise RuntimeError("handler bug")
            real_notify(path)

        d.intake.notify = flaky_notify
        with caplog.at_level(logging.ERROR, logger="product_studio.daemon"):
            (env.inbox / "a.png").write_bytes(png_bytes(1))  # create + modify + close: the first two raise
            wait_for(lambda: calls["n"] >= 2, 5, "handler errors")
            (env.inbox / "b.png").write_bytes(png_bytes(2))
            wait_for(lambda: "b" in env.records()["edited"], 10, "b processed after handler errors")
        assert d.observer.current.is_alive()
        assert any(getattr(r, "event", "") == "handler_error" for r in caplog.records)


def test_missed_events_are_caught_by_the_periodic_rescan(env, tmp_path):
    staging = tmp_path / "staging"
    (staging / "dir").mkdir(parents=True)
    (staging / "dir" / "x.png").write_bytes(png_bytes(5))
    with env.running(rescan_seconds=0.5) as d:
        d.observer.current.unschedule_all()  # no events at all, as on a share that sends none
        (env.inbox / "a.png").write_bytes(png_bytes(1))
        os.rename(staging / "dir", env.inbox / "dir")
        wait_for(lambda: env.n_records() == 2, 10, "records from the rescan alone")
    assert sorted(env.records()["edited"]) == ["a", "dir-x"]


def test_polling_mode_gives_the_same_result(env, tmp_path):
    staging = tmp_path / "staging"
    (staging / "shoot").mkdir(parents=True)
    (staging / "shoot" / "a.png").write_bytes(png_bytes(1))
    good = _jpeg(2)
    with env.running(poll_seconds=0.2, rescan_seconds=60) as d:
        assert d.observer_mode.startswith("polling")
        (env.inbox / "one.png").write_bytes(png_bytes(3))
        (env.inbox / "copy.png").write_bytes(png_bytes(3))
        (env.inbox / "bad.jpg").write_bytes(good[:100])
        os.rename(staging / "shoot", env.inbox / "shoot")
        wait_for(lambda: env.n_records() == 3 and d.ledger.counts()["duplicates"] == 1, 10, "records via polling")
        assert d.wait_idle(5)
    recs = env.records()
    assert sorted(recs["edited"]) in (["copy", "shoot-a"], ["one", "shoot-a"]) and recs["failed"] == ["bad"]


# ------------------------------------------------------------------------------------------------
# rules, layout, lock, lifecycle


def test_bad_rules_edit_is_refused_and_the_old_rules_stay(env, caplog):
    rules = env.root / "rules.yaml"
    rules.write_text("rules: []\n")
    with env.running(rules=rules) as d:
        h1 = d.processor.rules_hash
        (env.inbox / "a.png").write_bytes(png_bytes(1))
        wait_for(lambda: "a" in env.records()["edited"], 10, "a")
        with caplog.at_level(logging.ERROR, logger="product_studio.daemon"):
            rules.write_text("rules: [unclosed\n")
            # The status is published first, then the line is logged (by the worker thread): wait for both.
            wait_for(lambda: d.status.rules.get("last_error"), 20, "the refusal")
            wait_for(lambda: any(getattr(r, "event", "") == "rules_refused" for r in caplog.records), 20,
                     "the refusal logged")
        assert "not valid YAML" in d.status.rules["last_error"] and d.processor.rules_hash == h1
        (env.inbox / "b.png").write_bytes(png_bytes(2))
        wait_for(lambda: "b" in env.records()["edited"], 10, "b")
        rules.write_text("rules: [{name: new}]\n")
        wait_for(lambda: d.processor.rules_hash != h1, 5, "the good edit")
        assert d.status.rules["last_error"] is None
        (env.inbox / "c.png").write_bytes(png_bytes(3))
        wait_for(lambda: "c" in env.records()["edited"], 10, "c")
    used = {s: json.loads((env.outbox / f"{s}.json").read_text())["rules"]["sha256"] for s in "abc"}
    assert used["a"] == used["b"] == h1 != used["c"]
    assert {r.name: r.rules_hash for r in env.rows()}["c.png"] == used["c"]


@pytest.mark.parametrize("layout", ["outbox_in_inbox", "archive_in_inbox", "ledger_in_inbox", "inbox_in_outbox",
                                    "outbox_is_inbox", "missing_inbox"])
def test_output_inside_the_inbox_is_refused_at_start(env, layout):
    s, ds = env.settings, {}
    if layout == "outbox_in_inbox":
        s.paths.outbox = env.inbox / "out"
    elif layout == "archive_in_inbox":
        ds["archive_dir"] = env.inbox / "done"
    elif layout == "ledger_in_inbox":
        s.paths.ledger = env.inbox / ".ledger.sqlite3"
    elif layout == "inbox_in_outbox":
        s.paths.inbox = env.outbox / "in"
        (env.outbox / "in").mkdir(parents=True)
    elif layout == "outbox_is_inbox":
        s.paths.outbox = env.inbox
    else:
        s.paths.inbox = env.root / "nope"
    d = env.daemon(**ds)
    with pytest.raises(DaemonConfigError) as ei:
        d.start()
    msg = str(ei.value)
    assert ("does not exist" if layout == "missing_inbox" else "inside") in msg
    assert not (env.inbox / "out").exists() and d.worker is None


def test_a_second_daemon_on_the_same_inbox_is_refused(env, tmp_path):
    with env.running():
        with pytest.raises(DaemonLockedError) as ei:
            env.daemon().start()
        assert f"pid {os.getpid()}" in str(ei.value) and str(env.inbox) in str(ei.value)
        other = Settings()
        other.base_dir = env.root
        other.paths.ledger = tmp_path / "elsewhere" / "ledger.sqlite3"  # another lock folder, same inbox
        d2 = Daemon(other, lambda: PassThroughProcessor(other, None), DaemonSettings(**FAST))
        with pytest.raises(DaemonLockedError, match="already watching"):
            d2.start()
    with env.running():  # released on stop
        pass


def test_leave_disposition_and_restart_do_not_reprocess(env):
    with env.running(disposition="leave") as d:
        (env.inbox / "a.png").write_bytes(png_bytes(1))
        (env.inbox / "dup.png").write_bytes(png_bytes(1))
        wait_for(lambda: env.n_records() == 1 and d.ledger.counts()["duplicates"] == 1, 10, "processed once")
        assert d.wait_idle(5)
    assert env.inbox_files() == ["a.png", "dup.png"]
    with env.running(disposition="leave") as d:
        assert d.wait_idle(5)
        assert d.ledger.counts()["duplicates"] == 1
    assert env.processors[1].calls == [] and len(env.rows()) == 1


def test_delete_disposition_keeps_failed_inputs(env):
    with env.running(disposition="delete") as d:
        (env.inbox / "a.png").write_bytes(png_bytes(1))
        (env.inbox / "bad.png").write_bytes(b"garbage")
        wait_for(lambda: env.n_records() == 2, 10, "two records")
        assert d.wait_idle(5)
    assert env.inbox_files() == [] and [p.name for p in (env.outbox / "archive").iterdir()] == ["bad.png"]


class Gated(PassThroughProcessor):
    """Holds every image until the test opens the gate."""

    def __init__(self, settings, rules_path, gate):
        super().__init__(settings, rules_path)
        self.gate = gate

    def process(self, path, outbox, *, sha256, stem):
        assert self.gate.wait(30), "the test never opened the gate"
        return super().process(path, outbox, sha256=sha256, stem=stem)


def gated_daemon(env: Env, gate: threading.Event) -> Daemon:
    d = Daemon(env.settings, lambda: Gated(env.settings, None, gate), DaemonSettings(**FAST))
    env.daemons.append(d)
    return d


def test_stop_waits_for_the_current_image_or_requeues_it(env):
    gate = threading.Event()
    d = gated_daemon(env, gate)
    d.start()
    (env.inbox / "a.png").write_bytes(png_bytes(1))
    wait_for(lambda: d.worker.current is not None, 20, "a running")
    assert stop(d, grace=0.2) is False  # gave up waiting: requeued, not counted as an attempt
    (row,) = env.rows()
    assert row.state == "pending" and row.attempts == 0
    gate.set()  # the abandoned thread finishes its image and records nothing
    d.worker.thread.join(20)
    assert not d.worker.thread.is_alive()
    with env.running() as d2:
        wait_for(lambda: d2.ledger.counts()["done"] == 1, 20, "a done after restart")
        assert d2.wait_idle(10)
    assert env.records()["edited"] == ["a"] and env.processors[0].calls == ["a.png"]
    assert not list(env.outbox.glob(".*.tmp-*"))


def test_rows_left_running_by_a_crash_are_resumed(env):
    (env.inbox / "a.png").write_bytes(png_bytes(1))
    with env.running() as d:
        wait_for(lambda: env.n_records() == 1, 10, "a")
    # Simulate a crash mid-image and one before the input was archived.
    (env.inbox / "b.png").write_bytes(png_bytes(2))
    led = Ledger(env.outbox / ".ledger.sqlite3").open()
    from pipeline.io.hashing import file_sha256

    row = led.add(sha256=file_sha256(env.inbox / "b.png"), rules_hash="none", version=PIPELINE_VERSION,
                  source=str(env.inbox / "b.png"), name="b.png", size=1, stem_candidates=iter(["b"]))
    led.claim("none")
    led.close()
    (env.outbox / ".b.png.tmp-abc123").write_bytes(b"partial")
    with env.running() as d:
        wait_for(lambda: d.ledger.counts()["done"] == 2, 10, "b resumed")
        assert d.wait_idle(5)
    rows = {r.name: r for r in env.rows()}
    # The daemon's "crash" is not counted against b; it ran in an isolated child instead.
    assert rows["b.png"].attempts == 1 and rows["b.png"].interruptions == 1 and rows["b.png"].deaths == 0
    assert rows["b.png"].id == row.id
    assert json.loads((env.outbox / "b.json").read_text())["pid"] != os.getpid()
    assert sorted(env.records()["edited"]) == ["a", "b"] and not (env.outbox / ".b.png.tmp-abc123").exists()


def test_stem_names():
    assert make_stem_base("a.jpg") == "a"
    assert make_stem_base("shoot 1/IMG.0001.JPG") == "shoot_1-IMG_0001"
    assert make_stem_base("été/ß.png") == "été-ß"
    assert make_stem_base("___.png") == "image"


def test_status_file_is_written_and_readable(env):
    from daemon.status import gather_status

    gate = threading.Event()
    d = gated_daemon(env, gate)
    d.start()
    try:
        (env.inbox / "a.png").write_bytes(png_bytes(1))
        (env.inbox / "b.png").write_bytes(png_bytes(2))
        wait_for(lambda: d.worker.current is not None, 20, "a running")

        def ready():
            i = gather_status(d.paths.ledger)
            return (i if i["daemons"] and i["daemons"][0].get("current") and i["counts"]["running"] == 1
                    and i["queue_depth"] == 1 else None)

        info = wait_for(ready, 20, "status with the current image and one queued")
        (dm,) = info["daemons"]
        assert dm["alive"] and dm["state"] == "running" and dm["current"]["name"] in ("a.png", "b.png")
    finally:
        gate.set()
        stop(d)
    (dm,) = gather_status(d.paths.ledger)["daemons"]
    assert not dm["alive"] and dm["state"] == "stopped"


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_a_model_that_cannot_load_stops_the_daemon_and_requeues_the_image(env):
    from pipeline.models.registry import ModelLoadError

    class NoModels(PassThroughProcessor):
        def process(self, path, outbox, *, sha256, stem):
            raise ModelLoadError("sam", "nowhere", "weights missing")

    d = Daemon(env.settings, lambda: NoModels(env.settings, None), DaemonSettings(**FAST))
    env.daemons.append(d)
    d.start()
    (env.inbox / "a.png").write_bytes(png_bytes(1))
    wait_for(lambda: d._stop_requested.is_set(), 10, "the fatal stop request")
    stop(d)
    assert d.exit_code == 3
    (row,) = env.rows()
    assert row.state == "pending" and row.attempts == 0 and env.n_records() == 0
    assert env.inbox_files() == ["a.png"]


def test_a_dead_observer_is_restarted_and_an_overflow_triggers_a_rescan(env):
    with env.running(rescan_seconds=60) as d:
        first = d.observer.current
        first.stop()
        first.join(5)
        wait_for(lambda: d.observer.current is not None and d.observer.current is not first and d.observer.current.is_alive(), 5,
                 "a new observer")
        (env.inbox / "a.png").write_bytes(png_bytes(1))
        wait_for(lambda: env.records()["edited"] == ["a"], 10, "a via the new observer")
        d.observer.current.unschedule_all()  # from here on events are lost, as after a queue overflow
        (env.inbox / "b.png").write_bytes(png_bytes(2))
        # The next periodic rescan is a minute away: only the overflow's rescan finds b in time.
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; events were lost")
        wait_for(lambda: env.records()["edited"] == ["a", "b"], 20, "b found by the overflow rescan")


def test_files_moved_around_inside_the_inbox_while_queued_are_processed_once(env):
    with env.running(processor_kw={"delay": 0.4}) as d:
        for name in ("a.png", "b.png", "c.png"):
            (env.inbox / name).write_bytes(png_bytes(ord(name[0])))
        wait_for(lambda: d.worker.current is not None, 5, "the first image running")
        (env.inbox / "sub").mkdir()
        for name in ("a.png", "b.png", "c.png"):
            if (env.inbox / name).exists() and d.worker.current and d.worker.current.name != name:
                os.rename(env.inbox / name, env.inbox / "sub" / name)
        wait_for(lambda: env.n_records() == 3, 15, "three records")
        assert d.wait_idle(5)
    assert env.n_records() == 3
    rows = env.rows()
    assert len(rows) == 3 and all(r.state == "done" for r in rows)
    assert len({r.sha256 for r in rows}) == 3 and env.inbox_files() == []
