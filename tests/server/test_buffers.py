"""Host cache buffers: gathers that reuse the previous buffer, and the process's malloc settings."""

import platform

import numpy as np

from server.engine.buffers import gather
from server.engine.memory import keep_freed_memory


def test_gather_takes_rows_into_a_spare_of_the_same_shape():
    cache = np.arange(5 * 2 * 3 * 4, dtype=np.float32).reshape(5, 2, 3, 4)
    spare = np.full_like(cache, np.nan)
    order = np.array([4, 0, 0])
    taken = gather(cache, order, 3, 4, spare)
    assert taken is spare  # no new memory
    np.testing.assert_array_equal(taken[:3], cache[order])


def test_gather_allocates_when_the_spare_does_not_fit():
    cache = np.arange(5 * 2 * 3 * 4, dtype=np.float32).reshape(5, 2, 3, 4)
    too_small = np.zeros((2, 2, 3, 4), np.float32)
    order = np.array([3, 1, 2, 0, 4, 4])
    taken = gather(cache, order, 3, 4, too_small)
    assert taken is not too_small and len(taken) >= len(order)
    np.testing.assert_array_equal(taken[: len(order)], cache[order])
    cut = gather(cache, order[:2], 2, 2, np.zeros_like(cache))  # cut along positions: another shape
    np.testing.assert_array_equal(cut[:2], cache[order[:2], :, :2])


def test_malloc_settings_apply_on_glibc():
    assert keep_freed_memory() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
