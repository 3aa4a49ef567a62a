"""Daemon bookkeeping: intake -> ledger -> outbox throughput with a pass-through pipeline.

``python -m bench daemon``: N distinct ~1 MP JPEGs are moved into a watched inbox of the real
daemon (watchdog observer, settle check, SQLite WAL ledger, worker, atomic outputs, archive) whose
processor only decodes each image with the safe loader and writes the input's bytes back as the
output, with its record (no models). Reported:
images per second from the first drop to the last record, and the share of that time spent
outside the processor (the daemon's own bookkeeping). Goal: >= 25 images/s on this machine.
``--tiny`` (or ``--repeats``/``--size``) shrink the run for smoke tests.
"""

from __future__ import annotations

import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

GOAL_IMAGES_PER_S = 25.0
DEFAULT_IMAGES = 200
DEFAULT_SIZE = (1152, 864)  # ~1 MP
TINY_IMAGES = 20


def _make_jpegs(folder: Path, n: int, size: tuple[int, int]) -> list[Path]:
    """``n`` distinct JPEGs (distinct content, so the ledger sees n different hashes)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(0)
    base = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    base = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))
    out = []
    for i in range(n):
        img = base.copy()
        img[: 8, : 8] = [(i * 37) % 256, (i * 91) % 256, i % 256]  # makes every file's bytes unique
        p = folder / f"img{i:04d}.jpg"
        Image.fromarray(img).save(p, quality=90)
        out.append(p)
    return out


def run_daemon_bench(n: int = DEFAULT_IMAGES, size: tuple[int, int] = DEFAULT_SIZE, timeout: float = 600.0,
                     log=print) -> dict[str, Any]:
    from daemon.config import DaemonSettings
    from daemon.service import Daemon
    from daemon.testing import PassThroughProcessor, outcome_records
    from pipeline.imageio import atomic_write_bytes, atomic_write_text, load_image
    from pipeline.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as d:
        root = Path(d)
        log(f"writing {n} JPEGs of {size[0]}x{size[1]} ...")
        files = _make_jpegs(root / "staging", n, size)
        (root / "inbox").mkdir()
        settings = Settings()
        settings.base_dir = root
        inside = {"seconds": 0.0, "calls": 0}
        lock = threading.Lock()

        class Timed(PassThroughProcessor):
            """Pass-through: the safe loader decodes and checks the image, then the input's own bytes
            are written as the output (re-encoding a PNG would be a pipeline cost, not bookkeeping)."""

            def process(self, path: Path, outbox: Path, *, sha256: str, stem: str) -> dict:
                t = time.perf_counter()
                try:
                    data = Path(path).read_bytes()
                    loaded = load_image(data, name=str(path), max_pixels=settings.limits.max_pixels)
                    atomic_write_bytes(outbox / f"{stem}.jpg", data)
                    rec = {"status": "edited", "input": {"path": str(path), "sha256": loaded.sha256},
                           "outputs": {"image": f"{stem}.jpg"}}
                    atomic_write_text(outbox / f"{stem}.json", json.dumps(rec) + "\n")
                    return rec
                finally:
                    with lock:
                        inside["seconds"] += time.perf_counter() - t
                        inside["calls"] += 1

        ds = DaemonSettings(settle_seconds=0.2, rescan_seconds=5.0, status_interval_seconds=1.0)
        daemon = Daemon(settings, lambda: Timed(settings, None), ds)
        daemon.start()
        try:
            t0 = time.perf_counter()
            for f in files:  # a move is how a finished file appears at once, like a sync tool's rename
                os.replace(f, root / "inbox" / f.name)
            outbox = root / "outbox"
            end = time.monotonic() + timeout
            done = 0
            while time.monotonic() < end:
                done = sum(len(v) for v in outcome_records(outbox).values())
                if done >= n:
                    break
                time.sleep(0.02)
            wall = time.perf_counter() - t0
            counts = {k: len(v) for k, v in outcome_records(outbox).items()}
        finally:
            daemon.stop(10.0)
        if done < n:
            raise RuntimeError(f"only {done} of {n} images came out within {timeout:.0f} s")
    rate = n / wall
    outside = max(0.0, wall - inside["seconds"]) / wall
    return {
        "images": n, "image_size": list(size), "wall_s": wall, "images_per_s": rate,
        "pipeline_s": inside["seconds"], "share_outside_pipeline": outside, "outcomes": counts,
        "settle_s": ds.settle_seconds,
        "goal": {"images_per_s": GOAL_IMAGES_PER_S, "met": rate >= GOAL_IMAGES_PER_S},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def print_result(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="daemon bookkeeping (pass-through pipeline)")
    for col in ("images", "wall s", "images/s", "goal", "met", "time outside the pipeline"):
        t.add_column(col, justify="right")
    t.add_row(str(res["images"]), f"{res['wall_s']:.2f}", f"{res['images_per_s']:.1f}", f">= {GOAL_IMAGES_PER_S:g}",
              "[green]yes[/green]" if res["goal"]["met"] else "[red]NO[/red]", f"{res['share_outside_pipeline']:.0%}")
    con.print(t)
    con.print(f"context: {res['image_size'][0]}x{res['image_size'][1]} JPEGs, settle {res['settle_s']} s, outcomes "
              f"{res['outcomes']}, pass-through pipeline (decode + write) {res['pipeline_s']:.2f} s in total; peak RSS "
              f"{res['peak_rss_mib']:.0f} MiB")


def run_from_options(opts: Any) -> dict[str, Any]:
    """``python -m bench daemon``: ``--tiny`` runs 20 small images; ``--size`` sets the JPEG size."""
    n = TINY_IMAGES if opts.tiny else DEFAULT_IMAGES
    size = opts.size or ((320, 240) if opts.tiny else DEFAULT_SIZE)
    res = run_daemon_bench(n, size)
    print_result(res)
    return res
