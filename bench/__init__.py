"""Benchmarks: cost of the product's paths measured side by side with a baseline in one process.

Run with ``python -m bench`` (all) or ``python -m bench detect``; ``--quick`` for a run of a few
minutes. Every run writes ``bench-results/results.json`` and ``results.md`` (see
:mod:`bench.report`). Benchmarks report *ratios* measured in the same run, because absolute times
on shared or throttled machines drift between runs; absolute seconds are printed as context only.
Tests never assert wall times.
"""

from __future__ import annotations

import os

from pipeline.models.allocator import ENV as _MALLOC_ENV
from pipeline.models.allocator import keep_freed_memory, mode

# name -> "module:function"; each function takes the parsed CLI options and returns a result dict.
BENCHMARKS: dict[str, str] = {
    "detect": "bench.detect:run_from_options",
    "enhance": "bench.enhance:run_from_options",
    "daemon": "bench.daemon:run_from_options",
    "warm": "bench.warm:run_from_options",
    "dtype": "bench.dtype:run_from_options",
    "large": "bench.large:run_from_options",
    "fill": "bench.fill:run_from_options",
    "ops": "bench.ops:run_from_options",
}


def steady_malloc(enabled: bool = True) -> bool:
    """The product's allocator setting (:mod:`pipeline.models.allocator`: freed heap memory kept in the
    process), applied to the benchmark process before anything is timed, or, with ``enabled``
    False (``--stock-malloc``), refused for this process and its children. Every case runs under
    the same setting either way; the product's registry applies it by default."""
    if not enabled:
        os.environ[_MALLOC_ENV] = "stock"
    return keep_freed_memory()


def malloc_mode() -> str:
    """What the allocator setting is in this process, for the results' context."""
    return mode()
