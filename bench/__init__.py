"""Benchmarks: cost of the product's paths measured side by side with a baseline in one process.

Run with ``python -m bench`` (all) or ``python -m bench detect``; ``--quick`` for a run of a few
minutes. Every run writes ``bench-results/results.json`` and ``results.md`` (see
:mod:`bench.report`). Benchmarks report *ratios* measured in the same run, because absolute times
on shared or throttled machines drift between runs; absolute seconds are printed as context only.
Tests never assert wall times.
"""

from __future__ import annotations

import ctypes
import platform

# name -> "module:function"; each function takes the parsed CLI options and returns a result dict.
BENCHMARKS: dict[str, str] = {
    "detect": "bench.detect:run_from_options",
    "enhance": "bench.enhance:run_from_options",
    "daemon": "bench.daemon:run_from_options",
    "warm": "bench.warm:run_from_options",
    "dtype": "bench.dtype:run_from_options",
}

_malloc = "default"


def steady_malloc() -> bool:
    """Keep freed heap memory inside the process (glibc only; process-wide, so only the ``python -m
    bench`` entry point calls it). Returns whether it was applied.

    glibc serves large blocks with mmap and returns them (and trimmed heap tops) to the kernel on
    free, so every forward pass page-faults its activations back in. On VMs that hand freed pages to
    the host (virtio-balloon free page reporting) that costs millions of faults per SAM encode:
    measured here 2-3x slower and +-50% from run to run, which drowns the ratios. Reusing the
    memory removes that noise for every case alike.
    """
    global _malloc
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    # mallopt takes an int; -1 converts to SIZE_MAX inside glibc, i.e. never trim.
    if libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, -1) == 1:
        _malloc = "glibc, freed memory kept in process (no mmap, no trim)"
        return True
    return False


def malloc_mode() -> str:
    """What :func:`steady_malloc` did in this process, for the results' context."""
    return _malloc
