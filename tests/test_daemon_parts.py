"""The daemon's parts alone, without the Daemon and (except the worker test) without threads:
the arrival policy over a real ledger, the intake on an injected clock, the observer supervisor
with fake observers on an injected clock, the rule-file watch, the retry policy, and a worker given
only its narrow context."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pytest

from daemon.intake import Intake
from pipeline.io.hashing import file_sha256
from daemon.ledger import Ledger
from daemon.metrics import NullMetrics
from daemon.observer import ObserverSupervisor
from daemon.outbox import OutboxWriter
from daemon.policy import Arrival, decide
from daemon.rules_watch import RuleFile
from daemon.status import StatusBoard
from daemon.worker import RetryPolicy, Worker, WorkerContext, WorkerEvents
from helpers import png_bytes, time_limit, wait_for
from helpers.processors import PassThroughProcessor
from pipeline.settings import Settings

LOG = logging.getLogger("product_studio.daemon")
V = "v1"


@pytest.fixture(autouse=True)
def _time_limit():
    with time_limit(60):
        yield


class Clock:
    """Monotonic and wall time that move only when told to."""

    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def __call__(self) -> float:
        return self.mono

    def advance(self, s: float) -> None:
        self.mono += s
        self.wall += s


# ------------------------------------------------------------------------------------------------
# the arrival policy: a pure function over the ledger


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "ledger.sqlite3").open()
    yield led
    led.close()


def add(led: Ledger, sha: str, source: str, rules: str = "r1") -> int:
    return led.add(sha256=sha, rules_hash=rules, version=V, source=source, name=Path(source).name, size=1,
                   stem_candidates=iter([Path(source).stem, f"{Path(source).stem}-{sha[:8]}"])).id


def finish(led: Ledger, row_id: int, state: str, disposition: str | None) -> None:
    led.claim("r1")
    led.finish(row_id, state)
    if disposition is not None:
        led.set_disposition(row_id, disposition)


def judge(led: Ledger, sha: str, source: str, *, rules: str = "r1", duplicates: str = "skip",
          disposition: str = "archive", running: tuple[int, ...] = (), present: tuple[str, ...] = ()):
    d = decide(led, Arrival(source=source, name=Path(source).name, sha256=sha, rules_hash=rules, version=V),
               duplicates=duplicates, disposition=disposition, is_running=lambda i: i in running,
               exists=lambda p: p in present or p == source)
    return d.kind, (d.row.id if d.row is not None else None)


def test_policy_new_content_and_the_same_file_again(ledger):
    assert judge(ledger, "a" * 64, "/in/a.png") == ("new", None)
    rid = add(ledger, "a" * 64, "/in/a.png")
    assert judge(ledger, "a" * 64, "/in/a.png") == ("known", rid)  # queued: the same file, nothing to do
    ledger.claim("r1")
    assert judge(ledger, "a" * 64, "/in/a.png") == ("known", rid)  # running


def test_policy_finishes_a_disposal_a_crash_left_undone(ledger):
    rid = add(ledger, "a" * 64, "/in/a.png")
    finish(ledger, rid, "done", None)
    assert judge(ledger, "a" * 64, "/in/a.png") == ("finish_disposal", rid)
    assert judge(ledger, "a" * 64, "/in/a.png", running=(rid,)) == ("known", rid)  # the worker still holds it
    assert judge(ledger, "a" * 64, "/in/a.png", disposition="leave") == ("known", rid)
    ledger.set_disposition(rid, "left")
    assert judge(ledger, "a" * 64, "/in/a.png", disposition="leave") == ("known", rid)


def test_policy_duplicates_skip_or_reprocess(ledger):
    rid = add(ledger, "a" * 64, "/in/a.png")
    # another copy while the first is still queued (its file is there)
    assert judge(ledger, "a" * 64, "/in/copy.png", present=("/in/a.png",)) == ("duplicate", rid)
    finish(ledger, rid, "done", "archived:/arch/a.png")
    assert judge(ledger, "a" * 64, "/in/copy.png") == ("duplicate", rid)
    assert judge(ledger, "a" * 64, "/in/a.png") == ("duplicate", rid)  # same path again once moved out
    assert judge(ledger, "a" * 64, "/in/copy.png", duplicates="reprocess") == ("new", None)
    assert judge(ledger, "a" * 64, "/in/copy.png", rules="r2") == ("new", None)  # other rules: new work
    ledger.add_duplicate(rid, "/in/copy.png", "a" * 64, "left")
    assert judge(ledger, "a" * 64, "/in/copy.png") == ("known", None)  # this very duplicate was recorded


def test_policy_retries_a_failed_input_dropped_again(ledger):
    rid = add(ledger, "a" * 64, "/in/a.png")
    finish(ledger, rid, "failed", "archived:/arch/a.png")
    assert judge(ledger, "a" * 64, "/in/a.png") == ("retry", rid)
    assert judge(ledger, "a" * 64, "/in/again.png", duplicates="reprocess") == ("retry", rid)


def test_policy_follows_a_queued_file_that_was_renamed(ledger):
    rid = add(ledger, "a" * 64, "/in/a.png")
    assert judge(ledger, "a" * 64, "/in/sub/a.png") == ("renamed", rid)  # /in/a.png is gone
    assert judge(ledger, "a" * 64, "/in/sub/a.png", present=("/in/a.png",)) == ("duplicate", rid)


def test_policy_only_reads_the_ledger(ledger):
    rid = add(ledger, "a" * 64, "/in/a.png")
    before = (ledger.rows(), ledger.counts())
    for kw in ({}, {"duplicates": "reprocess"}, {"rules": "r2"}):
        judge(ledger, "a" * 64, "/in/copy.png", **kw)
        judge(ledger, "b" * 64, "/in/b.png", **kw)
    assert (ledger.rows(), ledger.counts()) == before and ledger.get(rid).state == "pending"


# ------------------------------------------------------------------------------------------------
# intake on an injected clock


def make_intake(inbox: Path, clk: Clock, taken: list, settle: float = 0.6, **kw) -> Intake:
    return Intake(inbox, settle, lambda p, sig, sha: taken.append((p.name, sha)) or True, LOG, clock=clk,
                  wall=lambda: clk.wall, **kw)


@pytest.mark.parametrize("events", [True, False], ids=["with-events", "rescan-only"])
def test_a_slow_writer_is_taken_once_complete(tmp_path, events):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    clk, taken = Clock(), []
    intake = make_intake(inbox, clk, taken, settle=0.6)
    data = png_bytes(7, (200, 150))
    target = inbox / "slow.png"
    chunks = 12
    with open(target, "wb") as fh:
        for i in range(chunks):  # the file grows for 12 x 0.15 s, each pause well under the settle period
            fh.write(data[i * len(data) // chunks:(i + 1) * len(data) // chunks])
            fh.flush()
            if events or i == 0:
                intake.consider(target)  # what the observer's modified event does
            last_write = clk()
            clk.advance(0.15)
            intake.tick()
            assert taken == [], f"taken after chunk {i + 1} of {chunks}"
    while not taken and clk() < last_write + 5.0:
        clk.advance(0.05)
        intake.tick()
    assert taken == [("slow.png", hashlib.sha256(data).hexdigest())]
    # Taken once unchanged for the settle period: at once with events; without them the change is
    # noticed when the candidate is next checked, at most one settle period later.
    assert last_write + 0.6 - 1e-9 <= clk() <= last_write + (0.7 if events else 1.3)
    for _ in range(3):  # later events and rescans of the unchanged file queue nothing again
        intake.consider(target)
        intake.scan()
        clk.advance(1.0)
        intake.tick()
    assert len(taken) == 1 and intake.candidates == 0


def test_junk_partials_symlinks_and_special_files_are_never_taken(tmp_path, caplog):
    caplog.set_level(logging.INFO, LOG.name)
    inbox, outside = tmp_path / "inbox", tmp_path / "outside.png"
    inbox.mkdir()
    outside.write_bytes(png_bytes(9))
    junk = (".DS_Store", "._real.png", "a.png.part", "b.png.crdownload", "c.png~", ".hidden.png", "Thumbs.db",
            "~$sheet.png")
    for name in junk:
        (inbox / name).write_bytes(png_bytes(1))
    (inbox / "link.png").symlink_to(outside)
    os.mkfifo(inbox / "pipe.png")
    (inbox / "notes.txt").write_text("not an image")
    (inbox / "real.png").write_bytes(png_bytes(2))
    clk, taken = Clock(), []
    intake = make_intake(inbox, clk, taken, settle=0.2, stall_grace=2.0)
    for _ in range(4):  # repeated rescans, past the settle period and the stall grace
        intake.scan()
        clk.advance(1.0)
        intake.tick()
    assert taken == [("real.png", file_sha256(inbox / "real.png"))]
    listed = {i["name"]: i["reason"] for i in intake.ignored_list()}
    assert set(listed) == set(junk) | {"link.png", "pipe.png", "notes.txt"}
    assert listed["link.png"].startswith("symlink") and listed["pipe.png"].startswith("not a regular file")
    assert listed["notes.txt"].startswith("not an image name") and listed["a.png.part"] == "partial download name"
    told = [r.fields["path"] for r in caplog.records if getattr(r, "event", "") == "ignored"]
    assert sorted(Path(p).name for p in told) == sorted(listed)  # each told once, at WARNING
    assert sorted(p.name for p in inbox.iterdir()) == sorted(set(listed) | {"real.png"})  # nothing moved


def test_non_images_are_taken_when_they_should_fail(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "notes.txt").write_text("not an image")
    clk, taken = Clock(), []
    intake = make_intake(inbox, clk, taken, settle=0.2, non_images="fail")
    intake.scan()
    clk.advance(0.3)
    intake.tick()
    assert [n for n, _ in taken] == ["notes.txt"] and intake.ignored_list() == []


# ------------------------------------------------------------------------------------------------
# observer supervision with fake observers on an injected clock


class FakeObserver:
    def __init__(self, fail: bool = False, timeout: float | None = None):
        self.fail, self.timeout = fail, timeout
        self.alive = False
        self.scheduled: list[tuple[str, bool]] = []

    def schedule(self, handler, path, recursive=False):
        self.scheduled.append((path, recursive))

    def start(self):
        if self.fail:
            raise OSError(28, "inotify watch limit reached")
        self.alive = True

    def stop(self):
        self.alive = False

    def join(self, timeout=None):
        pass

    def is_alive(self):
        return self.alive


def supervisor(tmp_path, clk, made: list, fail_inotify=lambda: False, fail_polling=lambda: False):
    inbox = tmp_path / "inbox"
    inbox.mkdir(exist_ok=True)
    intake = make_intake(inbox, clk, [])

    def inotify():
        made.append(FakeObserver(fail=fail_inotify()))
        return made[-1]

    def polling(timeout):
        made.append(FakeObserver(fail=fail_polling(), timeout=timeout))
        return made[-1]

    return ObserverSupervisor(inbox, intake, LOG, clock=clk, make_inotify=inotify, make_polling=polling), intake


def drain(intake: Intake) -> int:
    """How many nominations are waiting (and take them)."""
    n = 0
    while not intake._nominated.empty():
        intake._nominated.get_nowait()
        n += 1
    return n


def test_a_dead_observer_is_restarted_and_the_inbox_rescanned(tmp_path):
    clk, made = Clock(), []
    sup, intake = supervisor(tmp_path, clk, made)
    try:
        assert sup.start() == "inotify" and sup.current is made[0]
        assert sup.check() is False and drain(intake) == 0  # alive: nothing to do
        made[0].alive = False  # it died
        assert sup.check() is True and sup.current is made[1] and made[1].is_alive()
        assert drain(intake) == 1  # events were lost meanwhile: one full rescan
    finally:
        sup.stop()


def test_a_failing_restart_is_retried_every_retry_seconds(tmp_path, caplog):
    caplog.set_level(logging.ERROR, LOG.name)
    clk, made = Clock(), []
    broken = {"on": False}
    sup, intake = supervisor(tmp_path, clk, made, fail_inotify=lambda: broken["on"],
                             fail_polling=lambda: broken["on"])
    try:
        sup.start()
        broken["on"] = True  # the inbox share is gone
        made[0].alive = False
        assert sup.check() is False
        n = len(made)
        clk.advance(sup.retry_seconds - 0.01)
        assert sup.check() is False and len(made) == n  # no new try, no new log line yet
        errors = [r for r in caplog.records if getattr(r, "event", "") == "observer_error"]
        assert len(errors) == 1
        broken["on"] = False
        clk.advance(0.02)
        assert sup.check() is True and sup.current.is_alive() and drain(intake) == 1
    finally:
        sup.stop()


def test_inotify_unavailable_falls_back_to_polling(tmp_path):
    clk, made = Clock(), []
    sup, _ = supervisor(tmp_path, clk, made, fail_inotify=lambda: True)
    try:
        assert sup.start() == "polling every 5s (fallback)"
        assert made[-1].timeout == 5.0 and sup.current is made[-1]
    finally:
        sup.stop()


def test_an_inotify_overflow_log_line_requests_a_rescan(tmp_path):
    clk, made = Clock(), []
    sup, intake = supervisor(tmp_path, clk, made)
    sup.start()
    try:
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; events were lost")
        assert drain(intake) == 1
    finally:
        sup.stop()
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; events were lost")
    assert drain(intake) == 0  # a stopped supervisor no longer listens


# ------------------------------------------------------------------------------------------------
# the rule file and the retry policy


class Rules:
    def __init__(self):
        self.rules_hash = "old"

    def reload_rules(self, path):
        text = Path(path).read_text()
        if "bad" in text:
            raise ValueError("bad rules")
        self.rules_hash = hashlib.sha256(text.encode()).hexdigest()
        return self.rules_hash


def test_a_rule_edit_is_acted_on_once_it_looked_the_same_on_two_polls(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("rules: []\n")
    rf = RuleFile(path, LOG)
    rf.mark_loaded()
    assert rf.poll() is False
    path.write_text("rules: [{name: a}]\n")
    assert rf.poll() is False  # first sight of the change: maybe mid-write
    assert rf.poll() is True
    assert rf.poll() is False  # acted on once
    path.unlink()
    assert rf.poll() is False and rf.poll() is True  # a removed file is a change too
    assert RuleFile(None, LOG).poll() is False


def test_a_bad_rule_edit_is_refused_and_published_before_it_is_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, LOG.name)
    path = tmp_path / "rules.yaml"
    status, proc, published = StatusBoard(), Rules(), []
    status.rules = {"path": str(path), "hash": "old", "last_error": None}
    rf = RuleFile(path, LOG)

    def publish():
        published.append((dict(status.rules), len(caplog.records)))

    path.write_text("bad: [\n")
    assert rf.reload(proc, status, NullMetrics(), publish) is False
    assert proc.rules_hash == "old" and status.rules["last_error"] == "bad rules"
    path.write_text("rules: []\n")
    assert rf.reload(proc, status, NullMetrics(), publish) is True
    assert status.rules["hash"] == proc.rules_hash != "old" and status.rules["last_error"] is None
    events = [getattr(r, "event", "") for r in caplog.records]
    assert events == ["rules_refused", "rules_reloaded"]
    assert [n for _, n in published] == [0, 1]  # the status was written before each log line


def test_retry_policy_backs_off_exponentially_up_to_the_cap():
    p = RetryPolicy(max_attempts=5, backoff=2.0, backoff_max=10.0)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5)] == [2.0, 4.0, 8.0, 10.0, 10.0]


# ------------------------------------------------------------------------------------------------
# a worker given only its context


def test_a_worker_needs_only_its_context(tmp_path):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    led = Ledger(tmp_path / "ledger.sqlite3").open()
    settings = Settings()
    proc = PassThroughProcessor(settings, None)
    status, fatal, changed = StatusBoard(), [], []
    events = WorkerEvents(status=status, metrics=NullMetrics(), fatal=fatal.append, reload_rules=lambda: None,
                          input_changed=changed.append)
    writer = OutboxWriter(outbox, outbox / "archive", "archive")
    ctx = WorkerContext(ledger=led, processor=proc, writer=writer, events=events,
                        retry=RetryPolicy(max_attempts=2, backoff=0.01), log=LOG)
    names = {"a.png": png_bytes(1), "flaky.png": png_bytes(2), "boom.png": png_bytes(3), "bad.png": b"no image"}
    for name, data in names.items():
        (inbox / name).write_bytes(data)
        led.add(sha256=hashlib.sha256(data).hexdigest(), rules_hash="none", version=V, source=str(inbox / name),
                name=name, size=len(data), stem_candidates=iter([Path(name).stem]))
    w = Worker(ctx)
    w.start()
    try:
        wait_for(lambda: led.counts()["pending"] + led.counts()["running"] == 0, 30, "every row finished")
    finally:
        w.request_stop()
        w.join(10)
    assert not w.alive()
    rows = {r.name: r for r in led.rows()}
    led.close()
    assert {n: (r.state, r.attempts) for n, r in rows.items()} == {
        "a.png": ("done", 1), "flaky.png": ("done", 2), "boom.png": ("failed", 2), "bad.png": ("failed", 1)}
    assert all(r.disposition.startswith("archived:") for r in rows.values())
    boom = json.loads((outbox / "failed" / "boom.json").read_text())
    assert boom["error"].startswith("internal error after 2 attempts") and boom["input"]["disposition"] == "archived"
    assert status.processed == 4 and fatal == [] and changed == [] and os.listdir(inbox) == []
