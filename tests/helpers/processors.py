"""Test processors for the daemon, `run` and the Ray engine (test-only: never shipped).

``PassThroughProcessor`` follows the processor contract of :mod:`pipeline.run.process` without any
model: it loads the input with the safe loader and writes its pixels to ``OUT/STEM.png`` plus the
record ``OUT/STEM.json`` (last, atomically). Bad inputs get ``OUT/failed/STEM.json``. Names steer
it in tests: ``noproduct`` -> skipped, ``flaky`` -> raises on the first attempt, ``boom`` -> always
raises, ``perm`` -> raises a permanent error.

``make_crashing_processor`` is the real processor whose process dies on chosen names, for the Ray
engine's worker-death tests.

In-process tests hand a processor to :class:`daemon.service.Daemon` or monkeypatch
``pipeline.run.process.make_processor``; the daemon as a real process runs through
``tests/watch_passthrough.py`` (the real ``watch`` command with this processor). Environment:
``PRODUCT_STUDIO_TEST_DELAY`` (seconds spent "processing" each image) and
``PRODUCT_STUDIO_TEST_WRITE_DELAY`` (seconds spent writing the output image in chunks, to leave a
partial temp file behind when killed).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.io.imageio import ImageLoadError, load_image, save_image
from pipeline.errors import BadInput
from pipeline.io.outputs import now_iso, write_failure, write_record
from pipeline.settings import Settings, SettingsError, read_yaml_mapping


class PermanentTestError(BadInput):
    permanent = True


class PassThroughProcessor:
    def __init__(self, settings: Settings, rules_path: Path | None, *, delay: float = 0.0,
                 write_delay: float = 0.0):
        self.settings = settings
        self.delay = delay
        self.write_delay = write_delay
        self.calls: list[str] = []
        self._raised: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.rules: dict[str, Any] = {}
        self.rules_hash = "none"
        if rules_path is not None:
            self.reload_rules(rules_path)

    def reload_rules(self, path: Path) -> str:
        data, text = read_yaml_mapping(Path(path))
        rules = data.get("rules", [])
        if not isinstance(rules, list):
            raise SettingsError(path, [("rules", f"expected a list, got {type(rules).__name__}", None)])
        self.rules = data
        self.rules_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        return self.rules_hash

    def process(self, path: Path, outbox: Path, *, sha256: str, stem: str) -> dict:
        name = Path(path).name
        with self._lock:
            self.calls.append(name)
        base = {"pipeline_version": "test", "created": now_iso(), "rules": {"sha256": self.rules_hash},
                "pid": os.getpid()}
        if "boom" in name:
            raise RuntimeError("boom (test processor: always fails)")
        if "perm" in name:
            raise PermanentTestError("bad parameter (test processor: permanent error)")
        if "flaky" in name:
            with self._lock:
                self._raised[sha256] += 1
                first = self._raised[sha256] == 1
            if first:
                raise RuntimeError("flaky (test processor: fails on the first attempt)")
        t0 = time.perf_counter()
        try:
            loaded = load_image(path, max_pixels=self.settings.limits.max_pixels)
        except ImageLoadError as e:
            return write_failure(outbox, stem, str(path), str(e), {**base, "stage": "load"})
        t_load = time.perf_counter() - t0
        if self.delay:
            time.sleep(self.delay)
        inp = {"name": name, "path": str(path), "sha256": loaded.sha256, "size": list(loaded.size),
               "format": loaded.format, "frames": loaded.frames}
        if "noproduct" in name:
            return write_record(outbox, stem, {**base, "status": "skipped", "reason": "no product (test processor)",
                                               "input": inp})
        out = outbox / f"{stem}.png"
        if self.write_delay:
            _slow_save(loaded.image, out, self.write_delay)
        else:
            save_image(loaded.image, out)
        rec = {**base, "status": "edited", "input": inp, "outputs": {"image": out.name},
               "timings": {"load": round(t_load, 4), "write": round(time.perf_counter() - t0 - t_load, 4)}}
        return write_record(outbox, stem, rec)


CRASH_DIR_ENV = "PRODUCT_STUDIO_TEST_CRASH_DIR"
CRASHING = "helpers.processors:make_crashing_processor"  # a PoolOptions.processor_factory spec
PASSTHROUGH = "helpers.processors:make_passthrough"


def make_crashing_processor(settings: Settings, rules: Any) -> Any:
    """The real :class:`~pipeline.run.process.Processor`, except that its *process dies* (``os._exit(1)``,
    no exception, no cleanup: like a segfault or an OOM kill) on inputs named ``*crash-always*``
    every time, and on ``*crash-once*`` the first time per content. For the Ray engine's tests,
    as an actor's processor factory (``PoolOptions(processor_factory=CRASHING)``; the workers find
    this module through ``PYTHONPATH``, see ``tests/test_ray.py``).

    "First time" must survive the death, so it is a marker file per content hash in the folder
    named by ``$PRODUCT_STUDIO_TEST_CRASH_DIR`` (set before Ray starts, so workers inherit it)."""
    from pipeline.run.process import Processor

    class CrashingProcessor(Processor):
        def process(self, path: Path, outbox: Path, **kw: Any) -> dict:
            name = Path(path).name
            if "crash-always" in name:
                os._exit(1)
            if "crash-once" in name:
                folder = os.environ.get(CRASH_DIR_ENV)
                if not folder:
                    raise RuntimeError(f"crash-once inputs need ${CRASH_DIR_ENV} (a folder for the markers)")
                marker = Path(folder) / f"crashed-{hashlib.sha256(Path(path).read_bytes()).hexdigest()}"
                if not marker.exists():
                    marker.touch()
                    os._exit(1)
            return super().process(path, outbox, **kw)

    return CrashingProcessor(settings, rules)


def _slow_save(image: Any, target: Path, seconds: float) -> None:
    # Same temp naming and rename as pipeline.io.imageio's atomic writer, spread over `seconds`.
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    with os.fdopen(fd, "wb") as fh:
        n = 5
        for i in range(n):
            fh.write(data[i * len(data) // n:(i + 1) * len(data) // n])
            fh.flush()
            time.sleep(seconds / n)
        os.fsync(fh.fileno())
    os.replace(tmp, target)


def make_passthrough(settings: Settings, rules_path: Path | None) -> PassThroughProcessor:
    return PassThroughProcessor(settings, rules_path,
                                delay=float(os.environ.get("PRODUCT_STUDIO_TEST_DELAY", "0") or 0),
                                write_delay=float(os.environ.get("PRODUCT_STUDIO_TEST_WRITE_DELAY", "0") or 0))
