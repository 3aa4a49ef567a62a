"""The allocator setting is process-wide, so each case runs in a fresh interpreter."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

SNIPPET = """
from pipeline.settings import Settings
from pipeline.models.registry import resolve_runtime
from pipeline.models.allocator import mode
s = Settings()
s.runtime.device = "cpu"
s.runtime.keep_freed_memory = {keep}
resolve_runtime(s)
print(mode())
"""


def _mode(keep: bool, env: dict[str, str] | None = None) -> str:
    e = {k: v for k, v in os.environ.items() if k != "PRODUCT_STUDIO_MALLOC"}
    e.update(env or {})
    out = subprocess.run([sys.executable, "-c", SNIPPET.format(keep=keep)], capture_output=True, text=True,
                         env=e, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_registry_runtime_keeps_freed_memory_unless_told_not_to():
    assert _mode(True).startswith("glibc, freed memory kept")
    assert _mode(False) == "default"
    assert _mode(True, {"PRODUCT_STUDIO_MALLOC": "stock"}).startswith("stock")
