"""Decoder rows laid out on a (sources, width) grid, for cross-attention shared by a source's beams.

The beams of one source attend to the same encoder keys/values, so these are stored once
per source instead of once per row. The decoder step then gathers each
source's row queries into one grid row (N, width, ...) and attends with a small matrix
product per source: width queries against keys read once, where one row per query would
read them width times. Rows may come in any order and sources may have different numbers
of rows (mixed beam sizes, beams reordered in place); unused grid cells repeat row 0's
query and are never read back (a real row, so the graph needs no extra zero row to point at).
"""

from __future__ import annotations

import numpy as np


def query_grid(row_source: np.ndarray, sources: int) -> tuple[np.ndarray, np.ndarray]:
    """Place rows on the grid; row_source (R,) holds each row's source index in [0, sources).

    Returns slot_row (sources * width,): the row in each cell, 0 where empty;
    and row_slot (R,): each row's cell. width is the largest number of rows of one source.
    """
    rows = len(row_source)
    counts = np.bincount(row_source, minlength=sources)
    width = max(int(counts.max(initial=0)), 1)
    by_source = np.argsort(row_source, kind="stable")
    first_of_source = np.cumsum(counts) - counts
    rank = np.empty(rows, np.int64)
    rank[by_source] = np.arange(rows) - first_of_source[row_source[by_source]]
    row_slot = row_source * width + rank
    slot_row = np.zeros(sources * width, np.int64)
    slot_row[row_slot] = np.arange(rows)
    return slot_row, row_slot
