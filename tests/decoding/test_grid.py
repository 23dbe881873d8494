"""The query grid that lets the beams of a source share its cross-attention keys/values."""

import numpy as np

from decoding.grid import query_grid


def test_rows_of_mixed_sources_get_distinct_cells_in_their_source_row():
    row_source = np.array([2, 0, 2, 2, 1, 0, 2])  # any order, 1 to 4 rows per source
    slot_row, row_slot = query_grid(row_source, sources=4)
    width = 4  # source 2 has four rows
    assert len(slot_row) == 4 * width
    assert len(set(row_slot)) == len(row_source)  # one cell per row
    np.testing.assert_array_equal(row_slot // width, row_source)  # in its own source's grid row
    np.testing.assert_array_equal(slot_row[row_slot], np.arange(len(row_source)))  # the two maps agree
    empty = np.setdiff1d(np.arange(len(slot_row)), row_slot)
    assert np.all(slot_row[empty] == 0)  # empty cells repeat a real row, never read back
    assert np.all(slot_row[3 * width : 4 * width] == 0)  # a source without rows


def test_uniform_beams_in_source_order_are_the_identity():
    row_source = np.repeat(np.arange(5), 4)
    slot_row, row_slot = query_grid(row_source, sources=5)
    np.testing.assert_array_equal(slot_row, np.arange(20))
    np.testing.assert_array_equal(row_slot, np.arange(20))
