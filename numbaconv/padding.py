"""Non-zero padding modes, materialised once before the kernel runs (as torch does).

Zero padding is never materialised: every kernel clips its loops to the valid input
range.  ``reflect`` / ``replicate`` / ``circular`` map padded coordinates back into the
image with :func:`source_index`, so no read ever leaves the input.
"""

import math

import numpy as np

from .cpu._jit import copy_run, fill_run, jit
from .cpu._launch import Task
from .cpu._wcache import verified_finite

__all__ = ["pad_input", "source_index", "gather", "gather_compacted", "source_indices"]

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


@jit
def _gather_nchw(lo, hi, x, rows, cols, out):
    """Planes ``[lo, hi)`` (over ``n * C``) of ``out[n, c, i, j] = x[n, c, rows[i], cols[j]]``,
    or 0 where either index is -1.  (Element loops: a slice assignment in a serial function
    compiles Numba's shape-mismatch message, seconds of string code.)"""
    c_ = x.shape[1]
    zero = out.dtype.type(0)
    for job in range(lo, hi):
        n = job // c_
        c = job % c_
        for i in range(rows.size):
            if rows[i] < 0:
                for j in range(cols.size):
                    out[n, c, i, j] = zero  # (not a slice assignment: see cpu._jit.copy_run)
                continue
            for j in range(cols.size):
                out[n, c, i, j] = x[n, c, rows[i], cols[j]] if cols[j] >= 0 else zero


@jit
def _gather_nhwc(lo, hi, x, rows, cols, out):
    """Rows ``[lo, hi)`` (over ``n * rows``) of ``out[n, i, j, :] = x[n, rows[i], cols[j], :]``,
    or 0 where either index is -1."""
    h_, w_, c_ = x.shape[1], x.shape[2], x.shape[3]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    zero = out.dtype.type(0)
    for job in range(lo, hi):
        n = job // rows.size
        i = job % rows.size
        for j in range(cols.size):
            dst = ((n * rows.size + i) * cols.size + j) * c_
            if rows[i] < 0 or cols[j] < 0:
                fill_run(of, dst, c_, zero)
            else:
                copy_run(of, dst, xf, ((n * h_ + rows[i]) * w_ + cols[j]) * c_, c_)


_GATHER_NCHW = Task(_gather_nchw)
_GATHER_NHWC = Task(_gather_nhwc)


def gather(x, layout, rows, cols):
    """``x`` (C-contiguous, in ``layout``) at input rows ``rows`` and columns ``cols``
    (index arrays; -1 gives a zero): a new C-contiguous array."""
    n, c = x.shape[0], x.shape[1 if layout == "NCHW" else 3]
    if layout == "NCHW":
        out = np.empty((n, c, rows.size, cols.size), dtype=x.dtype)
        _GATHER_NCHW(n * c, x, rows, cols, out)
    else:
        out = np.empty((n, rows.size, cols.size, c), dtype=x.dtype)
        _GATHER_NHWC(n * rows.size, x, rows, cols, out)
    return out


def source_indices(coords, size, padding_mode):
    """Input indices that the (unpadded-frame) coordinates ``coords`` read: the padding mode's
    map (as :func:`source_index`), or -1 for zero padding outside ``[0, size)``."""
    coords = np.asarray(coords, dtype=np.int64)
    if padding_mode == "zeros":
        return np.where((coords >= 0) & (coords < size), coords, -1).astype(np.intp)
    if padding_mode == "reflect":
        i = np.where(coords < 0, -coords, coords)
        return np.where(i >= size, 2 * (size - 1) - i, i).astype(np.intp)
    if padding_mode == "replicate":
        return np.clip(coords, 0, size - 1).astype(np.intp)
    return np.mod(coords, size).astype(np.intp)  # circular


def gather_compacted(x, p, c):
    """The input of a :class:`~numbaconv.problem.Compaction` ``c`` of problem ``p``."""
    rows = np.arange(p.h, dtype=np.intp) if c.rows.coords is None else source_indices(c.rows.coords, p.h, p.padding_mode)
    cols = np.arange(p.w, dtype=np.intp) if c.cols.coords is None else source_indices(c.cols.coords, p.w, p.padding_mode)
    return gather(x, p.layout, rows, cols)


def pad_input(x, p):
    """``x`` (C-contiguous, in ``p.layout``) padded by ``p.padding`` in ``p.padding_mode``."""
    mode = _MODE_CODE[p.padding_mode]
    return gather(x, p.layout, _index_map(p.pad_top, p.h, p.pad_bottom, mode),
                  _index_map(p.pad_left, p.w, p.pad_right, mode))


# --- zero padding meets non-finite weights ---------------------------------------------------
# torch multiplies the zero padding by the weights, so 0 * inf = NaN reaches every output
# whose window covers the padding with a non-finite weight.  The kernels skip padding taps
# (no branch, no out-of-bounds read); the front door restores torch's NaNs afterwards.
@jit
def _max_exponent(bits, exponent):
    """``max(bits & exponent)``: equals ``exponent`` exactly when some value is Inf or NaN
    (a max reduction over unsigned ints: vectorised, no branch)."""
    m = bits[0] & exponent
    for i in range(bits.size):
        m = max(m, bits[i] & exponent)
    return m


@jit
def _nonfinite_parts(lo, hi, bits, exponent, chunk, flags):
    for t in range(lo, hi):
        a = t * chunk
        b = min(bits.size, a + chunk)
        if a < b:
            flags[t] = _max_exponent(bits[a:b], exponent) == exponent


_NONFINITE_PARTS = Task(_nonfinite_parts)


def _any_nonfinite(bits, exponent):
    """Any element of the float's bit view ``bits`` with an all-ones exponent (Inf or NaN),
    in up to 16 parts in parallel."""
    n = bits.size
    parts = min(n, 16)
    chunk = (n + parts - 1) // parts
    flags = np.zeros(parts, dtype=np.bool_)
    _NONFINITE_PARTS(parts, bits, exponent, chunk, flags)
    return flags.any()


_PARALLEL_SCAN_BYTES = 1 << 20
_EXP32 = np.uint32(0x7F800000)
_EXP64 = np.uint64(0x7FF0000000000000)


def any_nonfinite(a):
    """Whether ``a`` holds an Inf or a NaN.  Small arrays: ``a . a`` (BLAS), finite exactly
    when every value is, unless finite squares overflow it (then the exact check): faster
    than a compiled max-reduction over the bits and nothing to compile on a fresh install's
    first call (it took 0.1 s); large ones: that reduction, in parallel, no temporaries."""
    if a.size == 0:
        return False
    if a.nbytes < _PARALLEL_SCAN_BYTES:  # a parallel region costs more than the scan
        f = a.reshape(-1)  # (a copy only when not contiguous)
        with np.errstate(all="ignore"):  # (Inf, NaN or overflow: no warning, the answer is the value)
            s = np.dot(f, f)
        return not math.isfinite(s) and not bool(np.isfinite(a).all())
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    # (a C-contiguous view of any shape viewed as unsigned ints of its width, then flat)
    if a.dtype.itemsize == 4:
        bits, exponent = a.view(np.uint32).reshape(-1), _EXP32
    else:
        bits, exponent = a.view(np.uint64).reshape(-1), _EXP64
    return bool(_any_nonfinite(bits, exponent))


def _as_oihw(p, weight):
    """``weight`` (in ``p.weight_layout``) as a (K, C/G, R, S) view."""
    return np.transpose(weight, [p.weight_layout.index(a) for a in "OIHW"])


def padding_products(p, weight, out):
    """Give ``out`` (``p.out_shape``, in ``p.layout``) torch's NaNs where zero padding met a
    non-finite weight of ``weight`` (in ``p.weight_layout``).

    Cheap when every weight is finite: it scans the smaller of the weights and the output.
    A non-finite weight at a tap that reads real input somewhere makes that output
    non-finite, so a finite output leaves only the taps that never meet the image to check.
    """
    if not p.has_padding or p.padding_mode != "zeros" or out.size == 0:
        return
    if verified_finite(weight):  # (a weight cache compared these very weights with a finite copy)
        return
    if weight.size <= out.size:
        if not any_nonfinite(weight):  # before tap_reads: O(Ho * R + Wo * S) bytes
            return
    elif not any_nonfinite(out):
        dead, any_dead = p.dead_taps  # (R, S): never meets the image
        if not any_dead or np.isfinite(_as_oihw(p, weight)[:, :, dead]).all():
            return
    w = _as_oihw(p, weight)
    rows, cols = p.tap_reads
    nf = ~np.isfinite(w).all(axis=1)  # (K, R, S): a non-finite weight at that tap
    o = out if p.layout == "NCHW" else out.transpose(0, 3, 1, 2)
    for r, s in zip(*np.nonzero(nf.any(axis=0))):
        pad = ~rows[:, r][:, None] | ~cols[:, s][None, :]  # (Ho, Wo): the tap reads padding there
        if pad.any():
            for k in np.nonzero(nf[:, r, s])[0]:
                o[:, k][:, pad] = np.nan


def padding_products_grad_weight(p, dy, dw):
    """Give ``dw`` (in ``p.weight_layout``) torch's NaNs where zero padding met a non-finite
    ``dy`` (in ``p.layout``): torch's grad-weight sums ``dy * x`` over the padding too.

    Free when ``dy`` is finite (scanned when it is the smaller), or when ``dw`` is finite and
    every output pixel reads some real input (a non-finite ``dy`` there would have made
    ``dw`` non-finite); only outputs whose whole window is padding are checked then.
    """
    if not p.has_padding or p.padding_mode != "zeros" or dy.size == 0:
        return
    if dy.size <= dw.size and not any_nonfinite(dy):  # 0 * finite: nothing to give
        return
    rows, cols = p.tap_reads
    d = dy if p.layout == "NCHW" else dy.transpose(0, 3, 1, 2)
    if not any_nonfinite(dw):
        dead_rows, dead_cols = ~rows.any(axis=1), ~cols.any(axis=1)
        if not (dead_rows.any() or dead_cols.any()):
            return
        if np.isfinite(d[:, :, dead_rows]).all() and np.isfinite(d[:, :, :, dead_cols]).all():
            return
    nfk = ~np.isfinite(d).all(axis=0)  # (K, Ho, Wo)
    w = _as_oihw(p, dw)  # a writable view
    for r in range(p.r):
        for s in range(p.s):
            pad = ~rows[:, r][:, None] | ~cols[:, s][None, :]
            hit = (nfk & pad).any(axis=(1, 2))
            w[hit, :, r, s] = np.nan
