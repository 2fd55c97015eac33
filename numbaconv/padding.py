"""Non-zero padding modes, materialised once before the kernel runs (as torch does).

Zero padding is never materialised: every kernel clips its loops to the valid input
range.  ``reflect`` / ``replicate`` / ``circular`` map padded coordinates back into the
image with :func:`source_index`, so no read ever leaves the input.
"""

import numpy as np
from numba import prange

from .cpu._jit import jit, pjit

__all__ = ["pad_input", "source_index"]

_MODE_CODE = {"reflect": 0, "replicate": 1, "circular": 2}


@jit
def source_index(i, size, mode):
    """Input coordinate that padded coordinate ``i`` (possibly outside ``[0, size)``) reads."""
    if mode == 0:  # reflect, edge excluded: -1 -> 1, size -> size - 2
        if i < 0:
            return -i
        if i >= size:
            return 2 * (size - 1) - i
        return i
    if mode == 1:  # replicate
        return min(max(i, 0), size - 1)
    return i % size  # circular (Python modulo: never negative)


@jit
def _index_map(before, size, after, mode):
    m = np.empty(before + size + after, dtype=np.intp)
    for i in range(m.size):
        m[i] = source_index(i - before, size, mode)
    return m


@pjit
def _gather_nchw(x, rows, cols, out):
    n_, c_ = x.shape[0], x.shape[1]
    for job in prange(n_ * c_):
        n = job // c_
        c = job % c_
        for i in range(rows.size):
            for j in range(cols.size):
                out[n, c, i, j] = x[n, c, rows[i], cols[j]]


@pjit
def _gather_nhwc(x, rows, cols, out):
    n_ = x.shape[0]
    for job in prange(n_ * rows.size):
        n = job // rows.size
        i = job % rows.size
        for j in range(cols.size):
            out[n, i, j, :] = x[n, rows[i], cols[j], :]


def pad_input(x, p):
    """``x`` (C-contiguous, in ``p.layout``) padded by ``p.padding`` in ``p.padding_mode``."""
    mode = _MODE_CODE[p.padding_mode]
    rows = _index_map(p.pad_top, p.h, p.pad_bottom, mode)
    cols = _index_map(p.pad_left, p.w, p.pad_right, mode)
    if p.layout == "NCHW":
        out = np.empty((p.n, p.c, rows.size, cols.size), dtype=x.dtype)
        _gather_nchw(x, rows, cols, out)
    else:
        out = np.empty((p.n, rows.size, cols.size, p.c), dtype=x.dtype)
        _gather_nhwc(x, rows, cols, out)
    return out
