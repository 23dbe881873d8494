"""The process's malloc settings and their release (server/engine/memory.py)."""

import platform
import re
from pathlib import Path

import numpy as np
import pytest

from server.engine.memory import keep_freed_memory, return_freed_memory


def test_malloc_settings_apply_on_glibc():
    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


@pytest.mark.skipif(not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_freed_memory_kept_by_the_settings_goes_back_on_request():
    def resident_mb() -> float:
        return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024

    keep_freed_memory()
    blocks = [np.ones(1 << 20, np.uint8) for _ in range(96)]  # 96 MB in heap-sized pieces
    del blocks
    kept = resident_mb()
    return_freed_memory()
    assert resident_mb() < kept - 48
