"""The process's malloc settings (server/engine/memory.py)."""

import platform

from server.engine.memory import keep_freed_memory


def test_malloc_settings_apply_on_glibc():
    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
