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

from decoding import _native


def query_grid(row_source: np.ndarray, sources: int) -> tuple[np.ndarray, np.ndarray]:
    """Place rows on the grid; row_source (R,) holds each row's source index in [0, sources).

    Returns slot_row (sources * width,): the row in each cell, 0 where empty;
    and row_slot (R,): each row's cell, the rows of a source filling its grid row in row
    order. width is the largest number of rows of one source. (In C, decoding/_native.c:
    the backend recomputes the grid whenever beams are reordered.)
    """
    return _native.query_grid(row_source, sources)
