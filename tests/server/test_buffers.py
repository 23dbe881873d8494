"""Host cache buffers: resizing along the position axis, and the process's malloc settings."""

import platform

import numpy as np
import pytest

from server.engine.buffers import positions_on_2, resized
from server.engine.memory import keep_freed_memory


@pytest.mark.parametrize("axis", [2, 3])
def test_resizing_keeps_the_used_rows_positions(axis):
    cache = np.arange(5 * 2 * 3 * 4, dtype=np.float32).reshape(5, 2, 3, 4) + 1
    positions = cache.shape[axis]
    grown, cut = resized(cache, axis, positions + 2, 3), resized(cache, axis, 2, 3)
    assert grown.shape[axis] == positions + 2 and cut.shape[axis] == 2 and len(grown) == len(cut) == 5
    np.testing.assert_array_equal(positions_on_2(grown, axis)[:3, :, :positions], positions_on_2(cache, axis)[:3])
    assert not positions_on_2(grown, axis)[:3, :, positions:].any()  # new positions are zero
    np.testing.assert_array_equal(positions_on_2(cut, axis)[:3], positions_on_2(cache, axis)[:3, :, :2])


def test_malloc_settings_apply_on_glibc():
    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
