"""What the daemon itself writes: its failure records, and where inputs go once they have an outcome.

The processor writes the outputs and records of the images it processes (atomically, record last).
The daemon writes only (a) its own failure record when the processor could not produce one (an
exception, retries used up, a worker process that kept dying), (b) the completion of a failure
record once its input has been disposed of (where the input is now), and (c) the disposition:
inputs archived (same relative path in the archive), deleted, or left in place. All of it goes
through :class:`OutboxWriter`; moves are atomic (a crash leaves a full copy, never a partial one).

Output stems: one per input, from its inbox-relative name (:func:`pipeline.io.outputs.stem_for`), and
``-<sha8>`` (then ``-N``) when an earlier input already has that stem (:func:`stem_candidates`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.io.hashing import file_sha256
from pipeline.io.imageio import atomic_path, atomic_write_text
from pipeline.io.outputs import stem_for, write_failure

__all__ = ["OUTCOME_STATE", "STATE_OUTCOME", "OutboxWriter", "annotate_failure", "archive_target",
           "dispose_input", "make_stem_base", "move_file", "stem_candidates"]

OUTCOME_STATE = {"edited": "done", "skipped": "skipped", "failed": "failed"}  # record status -> ledger state
STATE_OUTCOME = {v: k for k, v in OUTCOME_STATE.items()}
_FOLDER = {"edited": "", "skipped": "skipped", "failed": "failed"}  # record status -> outbox sub-folder


def make_stem_base(name: str) -> str:
    """Output stem for an inbox-relative name: the one stem rule, :func:`pipeline.io.outputs.stem_for`."""
    return stem_for(name)


def stem_candidates(base: str, sha256: str) -> Iterator[str]:
    """``base``, then ``base-<sha8>``, then ``base-<sha8>-2``, ... (the first free one is used)."""
    yield base
    yield f"{base}-{sha256[:8]}"
    i = 2
    while True:
        yield f"{base}-{sha256[:8]}-{i}"
        i += 1


def archive_target(archive: Path, name: str, sha256: str) -> Path:
    """Where ``name`` (inbox-relative) goes in ``archive``: the same relative path, or with
    ``-<sha8>`` (then ``-N``) before the suffix when a *different* file already holds that name."""
    rel = Path(name)
    base = archive / rel

    def cands() -> Iterator[Path]:
        yield base
        yield base.with_name(f"{rel.stem}-{sha256[:8]}{rel.suffix}")
        for i in range(2, 1000):
            yield base.with_name(f"{rel.stem}-{sha256[:8]}-{i}{rel.suffix}")

    for c in cands():
        if not os.path.lexists(c):
            return c
        # A copy of this very content (an earlier crash mid-move) may be replaced.
        try:
            if c.is_file() and not c.is_symlink() and file_sha256(c) == sha256:
                return c
        except OSError:
            continue
    raise OSError(f"no free name for {name} in {archive}")


def move_file(src: Path, dst: Path) -> None:
    """Atomic move into place; across filesystems: copy to a hidden temp beside ``dst``, fsync, rename,
    then remove the source (a crash in between leaves a full copy, never a partial one)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    shutil.copystat(src, dst)  # after the rename: atomic_path gives the file a fresh file's mode
    os.unlink(src)


def dispose_input(src: Path, name: str, sha256: str, outcome: str, mode: str, archive: Path) -> str:
    """Apply the disposition to an input that has its outcome. Returns what was done:
    ``archived:PATH``, ``deleted``, ``left`` or ``gone`` (nothing there any more).

    ``delete`` never deletes a failed input: it is archived, so it can be fixed and dropped again."""
    if not os.path.lexists(src):
        return "gone"
    if mode == "leave":
        return "left"
    if mode == "delete" and outcome != "failed":
        os.unlink(src)
        return "deleted"
    target = archive_target(archive, name, sha256)
    move_file(src, target)
    return f"archived:{target}"


def annotate_failure(record: Path, sha256: str, source: str, disposition: str | None) -> None:
    """Complete a failed record once its input has been disposed of: ``input.sha256`` and where the
    input is now (``input.now_at``: the archive path, or the inbox path when left; None when it
    is gone), plus ``input.disposition``. Atomic rewrite; a missing or unreadable record is left."""
    try:
        rec = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(rec, dict):
        return
    inp = rec.get("input") if isinstance(rec.get("input"), dict) else {}
    what = disposition or ""
    now_at = what.partition(":")[2] if what.startswith("archived:") else (source if what == "left" else None)
    rec["input"] = {**inp, "sha256": sha256, "disposition": what.partition(":")[0] or None, "now_at": now_at}
    atomic_write_text(record, json.dumps(rec, indent=2, default=str) + "\n")


@dataclass(frozen=True)
class OutboxWriter:
    """The daemon's writes into ``outbox`` (records) and ``archive`` (inputs), with the disposition
    mode (``archive`` | ``delete`` | ``leave``)."""

    outbox: Path
    archive: Path
    disposition: str

    def record(self, stem: str, status: str) -> Path:
        """Where the record of ``stem`` with outcome ``status`` (edited | skipped | failed) lives."""
        return self.outbox / _FOLDER[status] / f"{stem}.json"

    def existing_record(self, stem: str, status: str) -> str | None:
        p = self.record(stem, status)
        return str(p) if p.exists() else None

    def stem_free(self, stem: str) -> bool:
        """No record of any outcome holds ``stem`` yet."""
        return not any(self.record(stem, s).exists() for s in _FOLDER)

    def write_failure(self, stem: str, source: str, error: str, extra: dict[str, Any]) -> Path:
        """The daemon's own ``failed/STEM.json`` (record last, atomic)."""
        write_failure(self.outbox, stem, source, error, extra)
        return self.record(stem, "failed")

    def clear_failure(self, stem: str) -> None:
        """Remove a stale failure record (a retry writes its own outcome; two would be wrong)."""
        try:
            self.record(stem, "failed").unlink()
        except FileNotFoundError:
            pass

    def dispose(self, src: Path, name: str, sha256: str, outcome: str) -> str:
        """:func:`dispose_input` with this writer's mode and archive. Raises OSError."""
        return dispose_input(src, name, sha256, outcome, self.disposition, self.archive)

    def annotate_failure(self, stem: str, sha256: str, source: str, disposition: str | None) -> None:
        """:func:`annotate_failure` on ``failed/STEM.json``. Raises OSError."""
        annotate_failure(self.record(stem, "failed"), sha256, source, disposition)
