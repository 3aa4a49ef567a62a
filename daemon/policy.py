"""The arrival policy: what a complete file in the inbox is, judged from the ledger alone.

:func:`decide` is a pure function of the ledger's rows (it reads, never writes) and of two facts
passed in (is a row being processed right now, does a path still exist). The service applies the
:class:`Decision` it returns (:meth:`daemon.service.Daemon._on_stable`). In order:

1. ``known``: the very file a row stands for (same path, same content) that is queued, being
   processed, or whose input was left in place: nothing to do. ``finish_disposal``: the same, but
   its outcome is recorded and the input was not yet moved out (a crash in between): dispose now.
2. ``known``: this very file (path + content) was already recorded as a duplicate and left.
3. ``renamed``: content that is still queued under a path that no longer exists: the queued row
   follows the file to its new path.
4. ``retry``: the same content (same rules, same pipeline version) failed before: dropped again,
   it is tried again with fresh attempts.
5. ``duplicate``: the same content already queued or edited/skipped under the same rules and
   pipeline version, with ``duplicates: skip``: recorded as a duplicate, disposed of like the
   original, not processed.
6. ``new``: everything else gets a row of its own (``duplicates: reprocess`` included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Literal

from daemon.ledger import ACTIVE, Ledger, Row

__all__ = ["Arrival", "Decision", "decide"]

Kind = Literal["known", "finish_disposal", "renamed", "retry", "duplicate", "new"]


@dataclass(frozen=True)
class Arrival:
    source: str          # absolute path in the inbox
    name: str            # inbox-relative, POSIX separators
    sha256: str
    rules_hash: str      # the rules in force now
    version: str         # the pipeline version now


@dataclass(frozen=True)
class Decision:
    kind: Kind
    row: Row | None = None  # the ledger row the decision is about (None for ``new``)


def decide(ledger: Ledger, arrival: Arrival, *, duplicates: str, disposition: str,
           is_running: Callable[[int], bool] = lambda row_id: False,
           exists: Callable[[str], bool] = os.path.lexists) -> Decision:
    """Judge ``arrival`` against the ledger (see the module docstring). ``duplicates``: ``skip`` |
    ``reprocess``; ``disposition``: ``archive`` | ``delete`` | ``leave``; ``is_running(row_id)``:
    the worker holds that row now; ``exists(path)``: the path is there (``os.path.lexists``)."""
    src, sha = arrival.source, arrival.sha256
    same = ledger.by_source(sha, src)
    # The very file a row stands for is still here (queued, being processed, left in place, or
    # not yet moved out because of a crash). Once a row's input was moved out, a file at the
    # same path is a new arrival and is judged below.
    if same is not None and (same.state in ACTIVE or same.disposition in (None, "left")):
        if same.state in ACTIVE or is_running(same.id):
            return Decision("known", same)
        if same.disposition is None and disposition != "leave":
            return Decision("finish_disposal", same)
        return Decision("known", same)
    if ledger.duplicate_seen(src, sha):
        return Decision("known")
    active = ledger.active_for(sha)
    if active is not None and not exists(active.source):
        return Decision("renamed", active)
    prev = active or ledger.latest_for_key(sha, arrival.rules_hash, arrival.version)
    if prev is not None and prev.state == "failed":
        return Decision("retry", prev)
    if prev is not None and duplicates == "skip":
        return Decision("duplicate", prev)
    return Decision("new")
