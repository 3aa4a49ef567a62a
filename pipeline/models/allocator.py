"""Keep freed heap memory inside the process (glibc), so model forwards stop re-faulting their pages.

glibc serves large blocks with mmap and hands them (and trimmed heap tops) back to the kernel on
free, so every forward pass page-faults its activations in again. On VMs that return freed pages
to the host (virtio-balloon free page reporting) that costs millions of faults per SAM encode:
measured on a 2-core cloud VM, one product image's detection took 13 s with glibc's defaults and
8 s with freed memory kept (``python -m bench warm``'s detect processes), for ~20 % more peak RSS.
A process that keeps models warm keeps its working memory anyway.

Applied once per process by the model registry when ``runtime.keep_freed_memory`` is true (the
default); ``PRODUCT_STUDIO_MALLOC=stock`` in the environment turns it off for a process and its
children (the benchmarks' ``--stock-malloc``). A no-op on other platforms and C libraries.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

ENV = "PRODUCT_STUDIO_MALLOC"
_lock = threading.Lock()
_mode = "default"


def keep_freed_memory() -> bool:
    """Tell glibc to never use mmap for heap blocks and never trim the heap. Process-wide and
    idempotent; returns whether the setting is in force."""
    global _mode
    with _lock:
        if _mode != "default":
            return _mode.startswith("glibc")
        if os.environ.get(ENV, "").strip().lower() == "stock":
            _mode = f"stock ({ENV}=stock)"
            return False
        if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
            return False
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:
            return False
        m_trim_threshold, m_mmap_max = -1, -4
        # mallopt takes an int; -1 converts to SIZE_MAX inside glibc, i.e. never trim.
        if libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, -1) == 1:
            _mode = "glibc, freed memory kept in process (no mmap, no trim)"
            return True
        return False


def mode() -> str:
    """What :func:`keep_freed_memory` did in this process (for records and benchmark context)."""
    return _mode
