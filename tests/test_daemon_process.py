"""The `watch` command as a real process: kill -9 mid-image then restart, SIGTERM, a second signal.

Runs the real `watch` command with the model-free pass-through processor through the test-only
entry point ``tests/watch_passthrough.py``; every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.ledger import Ledger, read_summary
from daemon.lock import lock_holder
from helpers import outcome_records, png_bytes, time_limit, wait_for
from pipeline.io.imageio import load_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _time_limit():
    with time_limit(60):
        yield


class Proc:
    def __init__(self, root: Path, delay: float = 0.0, write_delay: float = 0.0, tag: str = "run"):
        self.root = root
        self.log_path = root / f"daemon-{tag}.log"
        env = {**os.environ, "PRODUCT_STUDIO_TEST_DELAY": str(delay), "PRODUCT_STUDIO_TEST_WRITE_DELAY": str(write_delay),
               "PYTHONUNBUFFERED": "1"}
        env.pop("PRODUCT_STUDIO_CONFIG", None)
        self.log = open(self.log_path, "wb")
        self.p = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "watch_passthrough.py"), "watch", "--config", str(root / "settings.yaml"),
             "--settle", "0.2", "--rescan", "1",
             "--log-format", "json", "--retry-backoff", "0.05"],
            cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def status(self) -> dict | None:
        for f in (self.root / "outbox").glob(".daemon-*.status.json"):
            try:
                data = json.loads(f.read_text())
            except (OSError, ValueError):
                return None
            if data.get("pid") == self.p.pid:
                return data
        return None

    def wait_running(self) -> None:
        wait_for(lambda: (self.status() or {}).get("state") == "running" or self.p.poll() is not None, 20,
                 "the daemon to start")
        assert self.p.poll() is None, self.output()

    def wait(self, timeout: float) -> int:
        try:
            return self.p.wait(timeout)
        finally:
            self.log.close()

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)
        self.log.close()


@pytest.fixture
def root(tmp_path):
    (tmp_path / "inbox").mkdir()
    (tmp_path / "settings.yaml").write_text("root: .\npaths:\n  inbox: inbox\n  outbox: outbox\n")
    procs: list[Proc] = []
    yield tmp_path, procs
    for p in procs:
        p.kill()


def start(root_procs, **kw) -> Proc:
    root, procs = root_procs
    p = Proc(root, tag=str(len(procs)), **kw)
    procs.append(p)
    p.wait_running()
    return p


def summary(root: Path) -> dict:
    return read_summary(root / "outbox" / ".ledger.sqlite3")


def temp_files(outbox: Path) -> list[Path]:
    """Partial outputs (atomic-writer temps of images and records), not the status file's own."""
    return [p for p in outbox.rglob(".*") if ".tmp-" in p.name and ".status.json" not in p.name]


def test_kill_9_mid_image_then_restart_accounts_for_every_input_once(root):
    tmp, _ = root
    inputs = {f"in{i}": png_bytes(i, size=(64, 48)) for i in range(4)}
    for stem, data in inputs.items():
        (tmp / "inbox" / f"{stem}.png").write_bytes(data)
    # A long write (3 s per image): the kill lands while it is half written, however busy the machine.
    p = start(root, write_delay=3.0)
    # Kill while an output image is half written (its temp file exists, the record does not).
    wait_for(lambda: temp_files(tmp / "outbox"), 15, "an output being written")
    p.p.send_signal(signal.SIGKILL)
    assert p.wait(10) == -signal.SIGKILL
    s = summary(tmp)
    assert s["counts"]["running"] == 1 and temp_files(tmp / "outbox")
    killed = s["running"][0]["stem"]

    p2 = start(root)
    wait_for(lambda: summary(tmp)["counts"]["done"] == 4, 20, "all four done after the restart")
    p2.p.send_signal(signal.SIGTERM)
    assert p2.wait(15) == 0, p2.output()

    recs = outcome_records(tmp / "outbox")
    assert sorted(r.stem for r in recs["edited"]) == sorted(inputs) and not recs["skipped"] and not recs["failed"]
    for stem, data in inputs.items():
        rec = json.loads((tmp / "outbox" / f"{stem}.json").read_text())
        assert rec["status"] == "edited" and rec["input"]["name"] == f"{stem}.png"
        out = np.asarray(load_image(tmp / "outbox" / f"{stem}.png").image)
        assert np.array_equal(out, np.asarray(load_image(data).image))
        assert (tmp / "outbox" / "archive" / f"{stem}.png").read_bytes() == data
    assert temp_files(tmp / "outbox") == [], "partial files left in the outbox"
    assert not any((tmp / "inbox").iterdir())
    led = Ledger(tmp / "outbox" / ".ledger.sqlite3").open()
    rows = {r.stem: r for r in led.rows()}
    led.close()
    assert len(rows) == 4 and all(r.state == "done" for r in rows.values())
    # The kill was the operator's, not the image's: not counted; the image ran isolated after it.
    assert all(r.attempts == 1 and r.deaths == 0 for r in rows.values())
    assert rows[killed].interruptions == 1 and all(r.interruptions == 0 for s, r in rows.items() if s != killed)
    assert '"event": "resumed"' in p2.output() and '"event": "temp_removed"' in p2.output()


def test_sigterm_finishes_the_current_image_and_exits_cleanly(root):
    tmp, _ = root
    (tmp / "inbox" / "a.png").write_bytes(png_bytes(1))
    p = start(root, delay=1.0)
    wait_for(lambda: (p.status() or {}).get("current"), 10, "a being processed")
    t = time.monotonic()
    p.p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0, p.output()
    assert time.monotonic() - t < 8
    s = summary(tmp)
    assert s["counts"]["done"] == 1 and s["counts"]["running"] == s["counts"]["pending"] == 0
    assert (tmp / "outbox" / "a.json").exists() and (tmp / "outbox" / "archive" / "a.png").exists()
    (status_file,) = (tmp / "outbox").glob(".daemon-*.status.json")
    assert json.loads(status_file.read_text())["state"] == "stopped"
    assert lock_holder(status_file.with_name(status_file.name.replace(".status.json", ".lock"))) is None
    lines = [json.loads(line) for line in p.output().splitlines() if line.strip()]  # --log-format json
    events = [e["event"] for e in lines]
    assert all({"ts", "level", "event", "msg"} <= set(e) for e in lines)
    assert events.index("signal") < events.index("processed") < events.index("stopped")


def test_a_second_signal_exits_at_once_and_the_image_is_resumed(root):
    tmp, _ = root
    (tmp / "inbox" / "a.png").write_bytes(png_bytes(1))
    p = start(root, delay=20.0)
    wait_for(lambda: (p.status() or {}).get("current"), 10, "a being processed")
    p.p.send_signal(signal.SIGINT)
    time.sleep(3.5)  # well after the 2 s window in which repeated signals are one stop request
    t = time.monotonic()
    p.p.send_signal(signal.SIGTERM)
    assert p.wait(10) == 130, p.output()
    assert time.monotonic() - t < 5  # at once, not after the 20 s image
    assert summary(tmp)["counts"]["running"] == 1 and not (tmp / "outbox" / "a.json").exists()

    p2 = start(root)
    wait_for(lambda: summary(tmp)["counts"]["done"] == 1, 15, "a done after the restart")
    p2.p.send_signal(signal.SIGINT)
    assert p2.wait(15) == 0, p2.output()
    assert [r.stem for r in outcome_records(tmp / "outbox")["edited"]] == ["a"]


# ------------------------------------------------------------------------------------------------
# issue 22: kills of the daemon never fail a photo; repeated stop signals; quiet stops


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except FileNotFoundError:
        return False


def test_three_daemon_kills_during_one_photo_do_not_fail_it(root):
    tmp, _ = root
    data = png_bytes(1, size=(64, 48))
    (tmp / "inbox" / "a.png").write_bytes(data)
    for i in range(3):
        p = start(root, delay=20.0)  # killed as soon as it runs; the long delay only keeps it running
        key = "child_pid" if i else "name"  # after the first kill, the photo runs in an isolated child
        cur = wait_for(lambda: ((p.status() or {}).get("current") or {}).get(key) and p.status()["current"], 20,
                       "a being processed")
        p.p.send_signal(signal.SIGKILL)
        assert p.wait(10) == -signal.SIGKILL
        if i:
            assert cur["isolated"] is True
            wait_for(lambda: not _alive(cur["child_pid"]), 10, "the child to die with the daemon")
        assert summary(tmp)["counts"]["running"] == 1
    p = start(root)
    wait_for(lambda: summary(tmp)["counts"]["done"] == 1, 30, "a done after three kills")
    p.p.send_signal(signal.SIGTERM)
    assert p.wait(15) == 0, p.output()
    recs = outcome_records(tmp / "outbox")
    assert [r.stem for r in recs["edited"]] == ["a"] and not recs["failed"]
    assert np.array_equal(np.asarray(load_image(tmp / "outbox" / "a.png").image), np.asarray(load_image(data).image))
    led = Ledger(tmp / "outbox" / ".ledger.sqlite3").open()
    (row,) = led.rows()
    led.close()
    assert row.state == "done" and row.deaths == 0 and row.interruptions == 3 and row.attempts == 1


def test_two_sigterms_10ms_apart_finish_the_current_image_and_exit_0(root):
    tmp, _ = root
    (tmp / "inbox" / "a.png").write_bytes(png_bytes(1))
    p = start(root, delay=1.5)
    wait_for(lambda: (p.status() or {}).get("current"), 10, "a being processed")
    p.p.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    p.p.send_signal(signal.SIGTERM)  # as `make run` / `systemctl stop` deliver them
    assert p.wait(15) == 0, p.output()
    assert (tmp / "outbox" / "a.json").exists() and summary(tmp)["counts"]["done"] == 1
    assert "the same stop request" in p.output()


def test_a_stop_right_after_start_logs_nothing_at_error(root):
    tmp, _ = root
    for i in range(3):
        (tmp / "inbox" / f"a{i}.png").write_bytes(png_bytes(i))
        p = start(root)
        time.sleep(0.5 * i)
        p.p.send_signal(signal.SIGTERM)
        assert p.wait(15) == 0, p.output()
        lines = [json.loads(line) for line in p.output().splitlines() if line.startswith("{")]
        assert lines and lines[-1]["event"] == "stopped"
        assert [e for e in lines if e["level"] in ("error", "critical")] == [], p.output()
        assert "Traceback" not in p.output()
