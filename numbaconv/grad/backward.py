"""Backward passes of ``conv2d``: gradients w.r.t. the input, the weight and the bias.

Everything runs on the library's own kernels (no torch):

* **grad-weight** of dense and grouped layers (``auto``, :func:`_dw_tiles`): each thread
  fills its own im2col tiles and multiplies them into its own copy of ``dW`` (one
  full-size GEMM per tile, ``dW += dY @ im2col(x)^T``), the copies summed at the end.  With
  few channels per group (``Cg * Kg <= 16``: the seed notebook) it streams instead
  (:mod:`numbaconv.grad.stream`: nine register accumulators per channel pair and row,
  grad-bias on the way).  ``_DW_METHOD`` selects the older shifted-GEMM (stride 1) and
  chunked im2col variants for tests and benchmarks.
* **grad-input** is the transposed convolution: a forward convolution of ``dY`` with the
  flipped, channel-transposed weights where that is possible and pays (stride 1; large
  images with many channels, or few channels: the forward's streaming kernel), else
  ``cols = W^T @ dY`` then a ``col2im`` fold that adds every column back onto the input
  pixel it was read from.  NCHW folds in parallel over channels, NHWC over input rows (a
  gather), so no two threads ever write one element.
* **depthwise** layers (one input channel per group) skip the GEMMs, whose matrices would
  be 1 x 9: :mod:`numbaconv.grad.depthwise` computes all three gradients in one
  parallel region per layout.
* **grad-bias** is the sum of ``dY`` over batch and space.

Non-zero ``padding_mode``: the forward pass reads a materialised padded copy of ``x``; the
gradient w.r.t. that copy is computed first, then every padded pixel's gradient is added
to the input pixel it was copied from (the reflect / replicate / circular index map of
:func:`numbaconv.padding.source_index`).

Argument checking reuses :class:`~numbaconv.problem.ConvProblem` (the forward problem is
built from ``x`` / ``weight``), plus a check that ``grad_output`` has the forward result's
shape and dtype; errors follow the contract's style (``TypeError`` for types and dtypes,
``ValueError`` for shapes and values, each naming the argument and quoting the value).
"""

import dataclasses
import numbers
import threading

import numba
import numpy as np
from numba import prange

from .. import auto
from ..api import convolve
from ..cpu import winograd
from ..cpu._jit import blas_threads_local, gemm, jit, pjit, valid_range
from ..cpu._launch import Task
from ..cpu.im2col import _fill_nchw, _fill_nhwc, _fill_row_nchw, _fill_row_nhwc, workspace_bytes
from ..layout import to_layout
from ..padding import _MODE_CODE, _index_map, any_nonfinite, pad_input, padding_products_grad_weight
from ..problem import ConvProblem, check_array, is_device_array
from ..registry import algorithms
from .depthwise import _copy_row, depthwise_backward
from .stream import stream_dw_db, use_streaming_dw

__all__ = ["conv2d_backward", "conv2d_backward_input", "conv2d_backward_weight", "conv2d_backward_bias"]


# --- scratch buffers ---------------------------------------------------------------------------
# Temporaries (column buffers, padded copies) are kept per thread and reused: a fresh
# multi-MiB NumPy array is a fresh mmap, and its page faults on first touch cost more than
# the arithmetic of a small layer (measured: 5 ms instead of 0.9 ms for a 112x112 depthwise
# backward).  Each name keeps one buffer, grown to the largest size asked for;
# :func:`release_workspace` frees them.
_scratch_local = threading.local()


def _scratch(name, shape, dtype, zero=False):
    """A C-contiguous ``shape`` array from this thread's reusable buffer ``name``."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    pool = _scratch_local.__dict__.setdefault("pool", {})
    buf = pool.get(name)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = pool[name] = np.empty(max(size, 1), dtype=dtype)
    out = buf[:size].reshape(shape)
    if zero:
        out.fill(0)
    return out


def release_workspace():
    """Free this thread's reusable backward scratch buffers."""
    _scratch_local.__dict__.pop("pool", None)


@pjit
def _gemm_par(parts, transa, transb, m, n, k, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc):
    """:func:`gemm` with ``C`` split (along its longer side) over ``parts`` Numba threads.

    Each part runs BLAS restricted to its calling thread (``blas_threads_local``), so the
    GEMMs run on the same thread pool as the fills and folds around them: two pools spinning
    on two cores in turn cost more than the GEMMs themselves (measured: 8 ms instead of 5 ms
    for resnet_res2_3x3 on 2 cores).
    """
    if parts <= 1 or max(m, n) < 16 * parts:
        previous = blas_threads_local(1)
        gemm(transa, transb, m, n, k, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc)
        blas_threads_local(previous)
        return
    split_m = m >= n  # split the longer side: each part stays a well-shaped GEMM
    size = m if split_m else n
    step = (size + parts - 1) // parts
    for t in prange(parts):
        j0 = t * step
        j1 = min(size, j0 + step)
        previous = blas_threads_local(1)
        if j1 > j0:
            if split_m:  # rows j0:j1 of op(A) and of C
                ao = a_off + j0 * lda if transa else a_off + j0
                gemm(transa, transb, j1 - j0, n, k, a, ao, lda, b, b_off, ldb, beta, c, c_off + j0, ldc)
            else:  # columns j0:j1 of op(B) and of C
                bo = b_off + j0 if transb else b_off + j0 * ldb
                gemm(transa, transb, m, j1 - j0, k, a, a_off, lda, b, bo, ldb, beta, c, c_off + j0 * ldc, ldc)
        blas_threads_local(previous)


# --- col2im folds (race-free) -----------------------------------------------------------------
@pjit
def _scatter_nchw(cols, dx, n, i0, i1, sh, sw, pt, pl, dh, dw, r_, s_, wo_):
    """dx[n, c, i*sh + r*dh - pt, j*sw + s*dw - pl] += cols[(c, r, s), (i - i0) * wo_ + j]."""
    c_, h_, w_ = dx.shape[1], dx.shape[2], dx.shape[3]
    length = (i1 - i0) * wo_
    dxf = dx.ravel()
    for c in prange(c_):
        for r in range(r_):
            for s in range(s_):
                row = (c * r_ + r) * s_ + s
                off = s * dw - pl
                lo, hi_j = valid_range(off, sw, w_, wo_)
                base = row * length
                for i in range(i0, i1):
                    hi = i * sh + r * dh - pt
                    if hi < 0 or hi >= h_:
                        continue
                    src = np.uintp(base + (i - i0) * wo_)
                    xrow = ((n * c_ + c) * h_ + hi) * w_
                    if sw == 1:
                        d0 = np.uintp(xrow + off)
                        for j in range(np.uintp(lo), np.uintp(hi_j)):
                            dxf[d0 + j] += cols[src + j]
                    else:
                        for j in range(lo, hi_j):
                            dxf[xrow + j * sw + off] += cols[src + j]


@pjit
def _scatter_nhwc(cols, dx, t0, t1, sh, sw, pt, pl, dh, dw, r_, s_, ho_, wo_, groups):
    """Fold of output rows ``t0 <= n*ho_ + i < t1``; one job per input row (a gather)."""
    n_, h_, w_, c_ = dx.shape
    cg = c_ // groups
    patch = r_ * s_ * cg
    length = (t1 - t0) * wo_
    n0 = t0 // ho_
    n1 = (t1 - 1) // ho_ + 1
    dxf = dx.ravel()
    ucg = np.uintp(cg)
    for job in prange((n1 - n0) * h_):
        n = n0 + job // h_
        hi = job % h_
        for r in range(r_):
            num = hi + pt - r * dh
            if num < 0 or num % sh != 0:
                continue
            t = n * ho_ + num // sh
            if num // sh >= ho_ or t < t0 or t >= t1:
                continue
            for s in range(s_):
                off = s * dw - pl
                lo, hi_j = valid_range(off, sw, w_, wo_)
                for j in range(lo, hi_j):
                    d0 = np.uintp(((n * h_ + hi) * w_ + j * sw + off) * c_)
                    for g in range(groups):
                        src = np.uintp(g * length * patch + ((t - t0) * wo_ + j) * patch + (r * s_ + s) * cg)
                        dg = d0 + np.uintp(g) * ucg
                        for c in range(ucg):
                            dxf[dg + c] += cols[src + c]


# --- GEMM-based backward ------------------------------------------------------------------------
@jit
def _backward_nchw(x, w, dy, dx, dwt, cols, rows_per_chunk, sh, sw, pt, pl, dh, dw, groups,
                   want_dx, want_dw, parts):
    n_ = dy.shape[0]
    k_, cg, r_, s_ = w.shape
    ho_, wo_ = dy.shape[2], dy.shape[3]
    kg = k_ // groups
    patch = cg * r_ * s_
    plane = ho_ * wo_
    wf = w.ravel()
    dyf = dy.ravel()
    dwf = dwt.ravel()
    for n in range(n_):
        for i0 in range(0, ho_, rows_per_chunk):
            i1 = min(i0 + rows_per_chunk, ho_)
            length = (i1 - i0) * wo_
            if want_dw:
                _fill_nchw(x, n, i0, i1, cols, sh, sw, pt, pl, dh, dw, r_, s_, wo_)
                beta = 0.0 if n == 0 and i0 == 0 else 1.0  # (the first chunk writes dW: no zeroed copy)
                for g in range(groups):
                    # dW_g (Kg x P) (+)= dY_g (Kg x L) @ cols_g^T (L x P)
                    _gemm_par(parts, True, False, patch, kg, length, cols, g * patch * length, length,
                              dyf, (n * k_ + g * kg) * plane + i0 * wo_, plane, beta, dwf, g * kg * patch, patch)
            if want_dx:
                for g in range(groups):
                    # cols_g (P x L) = W_g^T (P x Kg) @ dY_g (Kg x L)
                    _gemm_par(parts, False, True, length, patch, kg, dyf, (n * k_ + g * kg) * plane + i0 * wo_, plane,
                              wf, g * kg * patch, patch, 0.0, cols, g * patch * length, length)
                _scatter_nchw(cols, dx, n, i0, i1, sh, sw, pt, pl, dh, dw, r_, s_, wo_)


@jit
def _backward_nhwc(x, w_hwio, dy, dx, dwt, cols, rows_per_chunk, sh, sw, pt, pl, dh, dw, groups,
                   want_dx, want_dw, parts):
    n_, ho_, wo_, k_ = dy.shape
    r_, s_, cg = w_hwio.shape[0], w_hwio.shape[1], w_hwio.shape[2]
    kg = k_ // groups
    patch = r_ * s_ * cg
    wf = w_hwio.ravel()
    dyf = dy.ravel()
    dwf = dwt.ravel()
    total = n_ * ho_
    for t0 in range(0, total, rows_per_chunk):
        t1 = min(t0 + rows_per_chunk, total)
        length = (t1 - t0) * wo_
        if want_dw:
            _fill_nhwc(x, t0, t1, cols, sh, sw, pt, pl, dh, dw, r_, s_, ho_, wo_, groups)
            beta = 0.0 if t0 == 0 else 1.0  # (the first chunk writes dW: no zeroed copy)
            for g in range(groups):
                # dW_g (P x Kg) (+)= cols_g^T (P x L) @ dY_g (L x Kg)
                _gemm_par(parts, False, True, kg, patch, length, dyf, t0 * wo_ * k_ + g * kg, k_,
                          cols, g * length * patch, patch, beta, dwf, g * kg, k_)
        if want_dx:
            for g in range(groups):
                # cols_g (L x P) = dY_g (L x Kg) @ W_g^T (Kg x P)
                _gemm_par(parts, True, False, patch, length, kg, wf, g * kg, k_, dyf, t0 * wo_ * k_ + g * kg, k_,
                          0.0, cols, g * length * patch, patch)
            _scatter_nhwc(cols, dx, t0, t1, sh, sw, pt, pl, dh, dw, r_, s_, ho_, wo_, groups)


# --- grad-weight by shifted GEMMs (stride 1): no im2col ---------------------------------------
# With stride 1, tap (r, s) reads the padded input at flat offset r*dh*Wp + s*dw from the
# output pixel's own, when the output is laid out at the padded width Wp (dY zero-extended
# to Wp columns).  So dW[:, :, r, s] is one GEMM of dY_pad with a *shifted view* of x_pad:
# no column buffer at all; the price is Wp / Wo extra columns (zeros) in the reduction.
@jit
def _dw_shifts_nchw(xp, dyp, tmp, r_, s_, dh, dw, groups, parts):
    """tmp[r, s, k, c] = sum_m dyp[n, k, m] * xp[n, g*cg + c, m + r*dh*Wp + s*dw] over n, m."""
    n_, c_, hp1, wp = xp.shape
    k_, m_ = dyp.shape[1], dyp.shape[2] * dyp.shape[3]
    cg = c_ // groups
    kg = k_ // groups
    plane = hp1 * wp
    xf = xp.ravel()
    yf = dyp.ravel()
    tf = tmp.ravel()
    for n in range(n_):
        for r in range(r_):
            for s in range(s_):
                shift = r * dh * wp + s * dw
                for g in range(groups):
                    # tmp_g^T (Cg x Kg) += X_rs,g (Cg x M) @ DY_g^T (M x Kg)
                    _gemm_par(parts, True, False, cg, kg, m_, xf, (n * c_ + g * cg) * plane + shift, plane,
                              yf, (n * k_ + g * kg) * m_, m_, 1.0, tf, (r * s_ + s) * k_ * cg + g * kg * cg, cg)


@jit
def _dw_shifts_nhwc(xp, dyp, dwt, r_, s_, dh, dw, groups, parts):
    """dwt[r, s, c, k] (HWIO) = sum_m x_pad[n, m + shift, g*cg + c] * dyp[n, m, k]."""
    n_, hp1, wp, c_ = xp.shape
    k_ = dyp.shape[3]
    m_ = dyp.shape[1] * dyp.shape[2]
    cg = c_ // groups
    kg = k_ // groups
    xf = xp.ravel()
    yf = dyp.ravel()
    wf = dwt.ravel()
    for n in range(n_):
        for r in range(r_):
            for s in range(s_):
                shift = r * dh * wp + s * dw
                for g in range(groups):
                    # dW_rs,g^T (Kg x Cg) += DY_g^T (Kg x M) @ X_rs,g (M x Cg)
                    _gemm_par(parts, False, True, kg, cg, m_, yf, n * m_ * k_ + g * kg, k_,
                              xf, (n * hp1 * wp + shift) * c_ + g * cg, c_,
                              1.0, wf, (r * s_ + s) * cg * k_ + g * kg, k_)


# --- grad-weight by im2col with per-thread partial sums -----------------------------------------
# Each Numba thread takes its own share of output-row tiles, fills its own column buffer
# and multiplies it into its OWN copy of dW (one full-size GEMM per tile, BLAS restricted to
# the calling thread); the copies are summed at the end.  Splitting each GEMM's output
# between threads instead (``_gemm_par``) left them waiting for each other after every
# fill and gave each a half-width GEMM: res2 NHWC 2.4-2.9 ms vs 1.2 ms for torch.
@jit
def _dw_tiles_nchw(lo, hi, x, dy, partial, cols, tile_rows, sh, sw, pt, pl, dh, dw, groups, r_, s_):
    """Threads ``[lo, hi)``: each its share of the tiles into its own ``partial[t]``."""
    n_, k_, ho_, wo_ = dy.shape
    c_ = x.shape[1]
    cg = c_ // groups
    kg = k_ // groups
    patch = cg * r_ * s_
    plane = ho_ * wo_
    nthreads = partial.shape[0]
    per = cols.size // nthreads
    tpi = (ho_ + tile_rows - 1) // tile_rows
    items = n_ * tpi
    yf = dy.ravel()
    for t in range(lo, hi):
        buf = cols[t * per:(t + 1) * per]
        pf = partial[t].ravel()
        for q in range(pf.size):  # (a loop: a serial slice fill compiles Numba's shape messages)
            pf[q] = 0
        previous = blas_threads_local(1)
        for item in range(t * items // nthreads, (t + 1) * items // nthreads):
            n = item // tpi
            i0 = (item % tpi) * tile_rows
            i1 = min(i0 + tile_rows, ho_)
            length = (i1 - i0) * wo_
            for row in range(c_ * r_ * s_):
                _fill_row_nchw(x, n, i0, i1, buf, row, sh, sw, pt, pl, dh, dw, r_, s_, wo_)
            for g in range(groups):
                # dW_g (Kg x P, row-major) += dY_g (Kg x L) @ cols_g^T (L x P)
                gemm(True, False, patch, kg, length, buf, g * patch * length, length,
                     yf, (n * k_ + g * kg) * plane + i0 * wo_, plane, 1.0, pf, g * kg * patch, patch)
        blas_threads_local(previous)


@jit
def _dw_tiles_nhwc(lo, hi, x, dy, partial, cols, tile_rows, sh, sw, pt, pl, dh, dw, groups, r_, s_):
    """Threads ``[lo, hi)``: each its share of the tiles into its own ``partial[t]``."""
    n_, ho_, wo_, k_ = dy.shape
    c_ = x.shape[3]
    cg = c_ // groups
    kg = k_ // groups
    patch = r_ * s_ * cg
    nthreads = partial.shape[0]
    per = cols.size // nthreads
    total = n_ * ho_
    items = (total + tile_rows - 1) // tile_rows
    yf = dy.ravel()
    for t in range(lo, hi):
        buf = cols[t * per:(t + 1) * per]
        pf = partial[t].ravel()
        for q in range(pf.size):  # (a loop: a serial slice fill compiles Numba's shape messages)
            pf[q] = 0
        previous = blas_threads_local(1)
        for item in range(t * items // nthreads, (t + 1) * items // nthreads):
            t0 = item * tile_rows
            t1 = min(t0 + tile_rows, total)
            length = (t1 - t0) * wo_
            if groups == 1:
                _fill_tile_nhwc(x, t0, t1, buf, sh, sw, pt, pl, dh, dw, r_, s_, ho_, wo_)
            else:
                for g in range(groups):
                    for row in range(t0, t1):
                        _fill_row_nhwc(x, row, t0, t1, g, buf, sh, sw, pt, pl, dh, dw, r_, s_, ho_, wo_, groups)
            for g in range(groups):
                # dW_g (P x Kg, HWIO) += cols_g^T (P x L) @ dY_g (L x Kg)
                gemm(False, True, kg, patch, length, yf, t0 * wo_ * k_ + g * kg, k_,
                     buf, g * length * patch, patch, 1.0, pf, g * kg, k_)
        blas_threads_local(previous)


@jit
def _fill_tile_nhwc(x, t0, t1, cols, sh, sw, pt, pl, dh, dw, r_, s_, ho_, wo_):
    """cols[(t - t0) * wo_ + j, (r, s, c)] = x[n, hi, wi, c] (one group): a kernel row's
    S pixels are ONE contiguous run of x when dilation is 1 and they are all inside
    (copied 8 values at a time: 0.69 -> ~0.3 ms for res2's 7 MB of columns)."""
    h_, w_, c_ = x.shape[1], x.shape[2], x.shape[3]
    patch = r_ * s_ * c_
    xf = x.ravel()
    for t in range(t0, t1):
        n = t // ho_
        i = t % ho_
        for j in range(wo_):
            dst = ((t - t0) * wo_ + j) * patch
            wi0 = j * sw - pl
            inside = dw == 1 and wi0 >= 0 and wi0 + s_ <= w_
            for r in range(r_):
                hi = i * sh + r * dh - pt
                d = dst + r * s_ * c_
                if hi < 0 or hi >= h_:
                    for q in range(np.uintp(s_ * c_)):
                        cols[np.uintp(d) + q] = 0
                    continue
                src = ((n * h_ + hi) * w_ + wi0) * c_
                if inside:
                    _copy_row(cols, np.uintp(d), xf, np.uintp(src), s_ * c_)
                    continue
                for s in range(s_):
                    wi = wi0 + s * dw
                    if wi < 0 or wi >= w_:
                        for q in range(np.uintp(c_)):
                            cols[np.uintp(d + s * c_) + q] = 0
                    else:
                        _copy_row(cols, np.uintp(d + s * c_), xf, np.uintp(src + s * dw * c_), c_)


@jit
def _sum_partials(partial, out):
    of = out.ravel()
    size = of.size
    nthreads = partial.shape[0]
    pf = partial.ravel()
    for q in range(np.uintp(size)):
        of[q] = pf[q]
    for t in range(1, nthreads):
        ps = pf[t * size:]
        for q in range(np.uintp(size)):
            of[q] += ps[q]


#: per-thread tiles (grad-weight) need at least this many output pixels per thread: each
#: tile's GEMM reads and writes the whole dW copy, which dominates with a short reduction
#: (res5: 512 x 4608 weights, 49 pixels; res4: 196 pixels)
_TILE_MIN_PIXELS = 256
#: column bytes per tile (per thread)
_TILE_BYTES = 2 << 20


_DW_TILES_NCHW = Task(_dw_tiles_nchw)
_DW_TILES_NHWC = Task(_dw_tiles_nhwc)


def _dw_by_tiles(p):
    if _DW_METHOD != "auto":
        return _DW_METHOD == "tiles"
    return p.n * p.ho * p.wo >= _TILE_MIN_PIXELS * numba.get_num_threads()


def _dw_tiles(p, x, dy, w_shape):
    """Grad-weight (kernel weight layout) by per-thread im2col tiles and partial sums."""
    nthreads = max(1, min(numba.get_num_threads(), p.n * p.ho))
    row_bytes = p.c * p.r * p.s * p.wo * p.dtype.itemsize
    # one run of rows per thread, in tiles of ~2 MiB of columns (L2-sized) -- but each tile
    # re-reads and re-writes the thread's dW copy, so never shorter than ~256 pixels
    per_thread = -(-(p.n * p.ho) // nthreads)
    tile_rows = max(1, min(per_thread, max(_TILE_BYTES // max(row_bytes, 1), -(-_TILE_MIN_PIXELS // p.wo))))
    if p.layout == "NCHW":
        tile_rows = min(tile_rows, p.ho)
        per_thread = min(per_thread, p.ho)
    tile_rows = -(-per_thread // -(-per_thread // tile_rows))  # equal tiles: threads stay balanced
    cols = _scratch("cols_tiles", (nthreads * tile_rows * p.wo * p.c * p.r * p.s,), p.dtype)
    partial = np.empty((nthreads,) + tuple(w_shape), dtype=p.dtype)
    dwt = np.empty(w_shape, dtype=p.dtype)
    kernel = _DW_TILES_NCHW if p.layout == "NCHW" else _DW_TILES_NHWC
    kernel(nthreads, x, dy, partial, cols, tile_rows, p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h,
           p.dil_w, p.groups, p.r, p.s)
    _sum_partials(partial, dwt)
    return dwt


#: "auto", "stream", "tiles", "shifts" or "im2col": how grad-weight is computed (benchmarks/
#: tests; "shifts" applies to stride 1 only, the others to any geometry).
_DW_METHOD = "auto"


def _dw_by_shifts(p):
    if p.stride_h != 1 or p.stride_w != 1 or _DW_METHOD == "im2col":
        return False
    if _DW_METHOD == "shifts":
        return True
    # (``auto`` now takes per-thread tiles first; this rule is the fallback order of the
    # older chunked paths.)  Measured on the suite's 3x3 layers: shifts won when the
    # zero columns are few (padded width within 10 % of the output's) and the GEMMs per tap
    # are not too lopsided (<= 64 output channels per group); in NCHW the shifted view is a
    # transposed operand with a plane-sized stride, which only pays off with many channels.
    wp = p.w + p.pad_left + p.pad_right
    if wp > 1.1 * p.wo or p.kg > 64:
        return False
    return p.layout == "NHWC" or p.cg >= 32


def _dw_shifted(p, x, dy, w_shape):
    hp, wp = p.h + p.pad_top + p.pad_bottom, p.w + p.pad_left + p.pad_right
    if p.layout == "NCHW":
        xp = _scratch("x_pad", (p.n, p.c, hp + 1, wp), p.dtype, zero=True)  # + a slack row for the shifts
        xp[:, :, p.pad_top:p.pad_top + p.h, p.pad_left:p.pad_left + p.w] = x
        dyp = _scratch("dy_spread", (p.n, p.k, p.ho, wp), p.dtype, zero=True)
        dyp[:, :, :, :p.wo] = dy
        tmp = np.zeros((p.r, p.s, p.k, p.cg), dtype=p.dtype)
        _dw_shifts_nchw(xp, dyp, tmp, p.r, p.s, p.dil_h, p.dil_w, p.groups, numba.get_num_threads())
        return np.ascontiguousarray(tmp.transpose(2, 3, 0, 1))
    xp = _scratch("x_pad", (p.n, hp + 1, wp, p.c), p.dtype, zero=True)
    xp[:, p.pad_top:p.pad_top + p.h, p.pad_left:p.pad_left + p.w, :] = x
    dyp = _scratch("dy_spread", (p.n, p.ho, wp, p.k), p.dtype, zero=True)
    dyp[:, :, :p.wo, :] = dy
    dwt = np.zeros(w_shape, dtype=p.dtype)
    _dw_shifts_nhwc(xp, dyp, dwt, p.r, p.s, p.dil_h, p.dil_w, p.groups, numba.get_num_threads())
    return dwt


# --- folding the gradient of a materialised padding back -------------------------------------
@pjit
def _unpad_nchw(dxp, rows, cols, dx):
    n_, c_ = dx.shape[0], dx.shape[1]
    for job in prange(n_ * c_):
        n = job // c_
        c = job % c_
        for i in range(rows.size):
            for j in range(cols.size):
                dx[n, c, rows[i], cols[j]] += dxp[n, c, i, j]


@pjit
def _unpad_nhwc(dxp, rows, cols, dx):
    n_, c_ = dx.shape[0], dx.shape[3]
    for job in prange(n_):
        for i in range(rows.size):
            for j in range(cols.size):
                for c in range(c_):
                    dx[job, rows[i], cols[j], c] += dxp[job, i, j, c]


def _fold_padding(dxp, p):
    """Gradient w.r.t. the unpadded input from the gradient w.r.t. its materialised padding."""
    mode = _MODE_CODE[p.padding_mode]
    rows = _index_map(p.pad_top, p.h, p.pad_bottom, mode)
    cols = _index_map(p.pad_left, p.w, p.pad_right, mode)
    dx = np.zeros(p.in_shape, dtype=p.dtype)
    (_unpad_nchw if p.layout == "NCHW" else _unpad_nhwc)(dxp, rows, cols, dx)
    return dx


# --- drivers ------------------------------------------------------------------------------------
def _rows_per_chunk(p, total_rows):
    row_bytes = p.c * p.r * p.s * p.wo * p.dtype.itemsize
    return int(max(1, min(total_rows, workspace_bytes() // max(row_bytes, 1))))


def _kernel_weight_layout(layout):
    return "OIHW" if layout == "NCHW" else "HWIO"


def _grads(p, x, w_k, dy, want_dx, want_dw, exact=False):
    """(dx, dW) on the zero-padded problem ``p``; ``w_k`` in the kernel's weight layout.

    ``x`` is C-contiguous (ignored unless ``want_dw``); results are C-contiguous, the
    weight gradient in the kernel's weight layout (OIHW for NCHW, HWIO for NHWC).
    ``exact``: never the shifted GEMMs (see :func:`_exact_dw`).
    """
    dtype = p.dtype
    dx = np.zeros(p.in_shape, dtype=dtype) if want_dx else np.zeros((1, 1, 1, 1), dtype=dtype)
    dwt = None
    if x is None:
        x = np.zeros((1, 1, 1, 1), dtype=dtype)
    geometry = (p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w)
    if p.n == 0 or not (want_dx or want_dw):
        return (dx if want_dx else None), (np.zeros(w_k.shape, dtype=dtype) if want_dw else None)
    if want_dw and _dw_by_tiles(p):
        dwt = _dw_tiles(p, x, dy, w_k.shape)
        want_dw = False
        if not want_dx:
            return None, dwt
    if want_dw and not exact and _dw_by_shifts(p):
        dwt = _dw_shifted(p, x, dy, w_k.shape)
        want_dw = False
        if not want_dx:
            return None, dwt
    total = p.ho if p.layout == "NCHW" else p.n * p.ho
    rows = _rows_per_chunk(p, total)
    cols = _scratch("cols", (rows * p.wo * p.c * p.r * p.s,), dtype)
    kernel = _backward_nchw if p.layout == "NCHW" else _backward_nhwc
    if want_dw:
        # the kernel's first chunk writes every entry of dW (a zeroed copy was a memset of up
        # to 9.4 MB a call: res5); no chunk when the output is empty
        dwt = np.empty(w_k.shape, dtype=dtype) if p.ho * p.wo > 0 else np.zeros(w_k.shape, dtype=dtype)
    dw_buf = dwt if want_dw else np.zeros((1, 1, 1, 1), dtype=dtype)
    kernel(x, w_k, dy, dx, dw_buf, cols, rows, *geometry, p.groups, want_dx, want_dw, numba.get_num_threads())
    return (dx if want_dx else None), dwt


#: "auto" (the rule below), "conv" or "gemm": how grad-input is computed (for benchmarks/tests).
_DX_METHOD = "auto"


def _dx_conv_possible(p):
    """Stride 1 and no side padded by more than the dilated kernel's reach.

    Then grad-input is a plain forward convolution of ``dY`` (zero-padded by
    ``dil * (R - 1) - pad`` on each side) with the flipped, channel-transposed weights, and
    can run on the fastest forward algorithm (``algorithm="auto"``), with no fold.
    """
    reach_h, reach_w = p.dil_h * (p.r - 1), p.dil_w * (p.s - 1)
    return (p.stride_h == 1 and p.stride_w == 1 and p.n > 0
            and max(p.pad_top, p.pad_bottom) <= reach_h and max(p.pad_left, p.pad_right) <= reach_w)


def _dx_as_convolution(p):
    """Whether grad-input runs as a forward convolution (else: GEMM + col2im fold)."""
    if _DX_METHOD != "auto":
        return _DX_METHOD == "conv" and _dx_conv_possible(p)
    # Measured (scripts/bench_backward.py): the GEMM + fold path is as fast or faster on
    # small images (7x7, 14x14: the forward's pixel blocking has little to work with) and
    # with few output channels (a short GEMM reduction costs little beside the fold); the
    # forward kernel wins on large images with many channels.  Depthwise layers have their
    # own direct kernels.
    if p.cg == 1 and p.groups > 1:
        return False
    if _dx_conv_possible(p) and auto.choose(_dx_geometry(p)) == "winograd":
        # the forward's Winograd path beats the GEMM + fold at every size it is chosen for
        # (res5's 7x7 and res4's 14x14 included; scripts/bench_backward.py)
        return True
    if p.cg <= 4 and p.kg <= 16:  # few channels: the forward's streaming kernel (seed: 70 -> 16 ms)
        return _dx_conv_possible(p)
    if p.ho * p.wo < 1024 or p.kg < 32:
        return False
    return _dx_conv_possible(p)


def _dx_padding(p):
    reach_h, reach_w = p.dil_h * (p.r - 1), p.dil_w * (p.s - 1)
    return (reach_h - p.pad_top, reach_h - p.pad_bottom), (reach_w - p.pad_left, reach_w - p.pad_right)


def _dx_geometry(p):
    """The problem :func:`_dx_by_convolution` runs (``dY`` convolved with the flipped,
    channel-transposed weights), without building any array."""
    (pt, pb), (pl, pr) = _dx_padding(p)
    return dataclasses.replace(p, c=p.k, h=p.ho, w=p.wo, k=p.c, pad_top=pt, pad_bottom=pb, pad_left=pl,
                               pad_right=pr, weight_layout=_kernel_weight_layout(p.layout), padding_mode="zeros")


def _dx_by_convolution(p, w_k, dy):
    """Grad-input as the forward convolution of ``dY`` with the flipped, channel-transposed
    weights ``W_t[g*Cg + c, k, r, s] = W[g*Kg + k, c, R-1-r, S-1-s]``.  Winograd transforms
    them straight from ``W``; other algorithms get them built in one copy, in the weight
    layout the forward kernels take for ``p.layout``, so the front door converts nothing."""
    wl = _kernel_weight_layout(p.layout)
    q = _dx_geometry(p)
    if auto.choose(q) == "winograd":
        out = np.empty(q.out_shape, dtype=p.dtype)
        winograd.run(q, np.ascontiguousarray(dy), w_k, None, out, flip=True)
        return out
    w_t = winograd.flipped_weights(w_k, wl, p.groups)
    q = ConvProblem.from_args_cached(dy, w_t, padding=_dx_padding(p), dilation=(p.dil_h, p.dil_w), groups=p.groups,
                                     layout=p.layout, weight_layout=wl)
    # torch's grad-input has no products with the padding (it stands for outputs that do not exist)
    return convolve(q, dy, w_t, None, with_padding_products=False)


def _check_grad_output(grad_output, p):
    check_array("grad_output", grad_output)
    if grad_output.dtype != p.dtype:
        raise TypeError(f"grad_output has dtype {grad_output.dtype} but x has dtype {p.dtype}; they must match")
    if grad_output.shape != p.out_shape:
        raise ValueError(f"grad_output has shape {grad_output.shape} but the convolution's output has shape "
                         f"{p.out_shape} ({p.layout})")


def _check_shape(name, shape):
    if not (isinstance(shape, (tuple, list)) and len(shape) == 4
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in shape)):
        raise ValueError(f"{name} must be a tuple of 4 non-negative ints, got {shape!r}")
    return tuple(int(v) for v in shape)


def _placeholder(shape, dtype):
    """A read-only array of ``shape`` that allocates nothing: validation needs only the shape."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def _backward(grad_output, x, weight, geometry, want_dx, want_dw):
    """``(p, dx, dW)`` (used by :mod:`numbaconv.grad.transpose` too)."""
    p, dx, dwt, _ = _backward_all(grad_output, x, weight, geometry, want_dx, want_dw)
    return p, dx, dwt


def _exact_dw(p, x, w_k, dy):
    """dW by paths that multiply only the (x, dY) pairs torch does.

    The fast grad-weight paths (shifted GEMMs, the NCHW depthwise flat sweeps) run whole
    input rows against dY rows zero-extended to the input's width: an Inf or NaN in ``x``
    that no valid output reads still meets a 0 there, and 0 * inf = nan where torch's sum
    stays finite.  Such a pair can only make dW non-finite, so :func:`_backward_all`
    checks dW (K*C*R*S values: free) and, only when some entry is not finite, computes it
    again here: im2col GEMMs, or, for NCHW depthwise, the NHWC depthwise kernel on
    transposed copies.
    """
    if p.cg == 1 and p.groups > 1:
        if p.layout == "NHWC":
            return depthwise_backward(p, x, w_k, dy, False, True, False)[1]
        q = dataclasses.replace(p, layout="NHWC", weight_layout="HWIO")
        xt = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        dyt = np.ascontiguousarray(dy.transpose(0, 2, 3, 1))
        w_hwio = np.ascontiguousarray(w_k.transpose(2, 3, 1, 0))
        dw_hwio = depthwise_backward(q, xt, w_hwio, dyt, False, True, False)[1]
        return np.ascontiguousarray(dw_hwio.transpose(3, 2, 0, 1))
    return _grads(p, x, w_k, dy, False, True, exact=True)[1]


def _dw_nonfinite(dwt, x, dy):
    """Whether ``dwt`` holds an Inf or a NaN (what :func:`_exact_dw` corrects), scanning the
    smaller side: with every value of ``x`` and ``dy`` finite no product is ``0 * inf``, so
    ``dwt`` can only overflow, which the exact paths would not change (res5's 9.4 MB of
    grad-weight against 200 KB of ``x`` and ``dy``)."""
    if x.size + dy.size < dwt.size and not (any_nonfinite(x) or any_nonfinite(dy)):
        return False
    return any_nonfinite(dwt)


def _backward_all(grad_output, x, weight, geometry, want_dx, want_dw, want_db=False):
    """``(p, dx, dW, db)``; ``db`` is ``None`` unless the path computed it on the way
    (depthwise layers sum ``dY`` while they copy it)."""
    p = ConvProblem.from_args(x, weight, None, **geometry)
    _check_grad_output(grad_output, p)
    dy = np.ascontiguousarray(grad_output)
    wl = _kernel_weight_layout(p.layout)
    # without grad-input only the weights' shape is used: an unwritten placeholder (a zeroed one
    # was a memset of the whole weight size per call), except for the depthwise kernels
    w_shape = tuple(dict(zip(p.weight_layout, weight.shape))[a] for a in wl)
    depthwise = p.is_depthwise  # (one input channel per group: the depthwise kernels below)
    w_k = (to_layout(weight, p.weight_layout, wl) if want_dx
           else np.zeros(w_shape, dtype=p.dtype) if depthwise else np.empty(w_shape, dtype=p.dtype))
    xk = None
    padded = p.padding_mode != "zeros" and p.has_padding
    if want_dw:
        xk = np.ascontiguousarray(x)
        if padded:
            xk = pad_input(xk, p)
    kp = p.materialised() if padded else p
    dx = db = None
    if depthwise and kp.n > 0 and (want_dx or want_dw):
        dx, dwt, db = depthwise_backward(kp, xk, w_k, dy, want_dx, want_dw, want_db)
    else:
        if want_dx and _dx_as_convolution(kp):
            dx = _dx_by_convolution(kp, w_k, dy)
            want_dx = False
        dwt = None
        if want_dw and kp.n > 0 and (_DW_METHOD == "stream" or (_DW_METHOD == "auto" and use_streaming_dw(kp))):
            dwt, db = stream_dw_db(kp, xk, dy, True, want_db)
            want_dw = False
        dx_gemm, dwt_gemm = _grads(kp, xk, w_k, dy, want_dx, want_dw)
        dx = dx_gemm if dx is None else dx
        dwt = dwt_gemm if dwt is None else dwt
    if dwt is not None and _dw_nonfinite(dwt, xk, dy):
        dwt = _exact_dw(kp, xk, w_k, dy)
    if dx is not None and padded:
        dx = _fold_padding(dx, p)
    if dwt is not None and wl != p.weight_layout:
        dwt = to_layout(dwt, wl, p.weight_layout)
    if dwt is not None:
        padding_products_grad_weight(p, dy, dwt)
    return p, dx, dwt, db


@jit
def _bias_grad_nchw(lo, hi, dy, db):
    """Channels ``[lo, hi)``."""
    n_, k_ = dy.shape[0], dy.shape[1]
    plane = dy.shape[2] * dy.shape[3]
    f = dy.ravel()
    for k in range(lo, hi):
        acc = np.zeros(1, dtype=db.dtype)
        t = acc[0]
        for n in range(n_):
            base = np.uintp((n * k_ + k) * plane)
            for j in range(np.uintp(plane)):
                t += f[base + j]
        db[k] = t


@jit
def _bias_grad_nhwc(lo, hi, dy, partial, pix):
    """Chunks ``[lo, hi)``: partial[chunk, p*K + k]: the chunk's sum of channel k over pixels
    ``p (mod pix)``: runs of ``pix * K`` contiguous values (~256) keep the loops long when K is
    small."""
    chunks, pk = partial.shape
    k_ = pk // pix
    pixels = dy.size // k_
    f = dy.ravel()
    for ch in range(lo, hi):
        acc = partial[ch]
        for q in range(acc.size):  # (a loop: see _dw_tiles_nchw)
            acc[q] = 0
        p1 = (ch + 1) * pixels // chunks
        for p0 in range(ch * pixels // chunks, p1, pix):
            base = np.uintp(p0 * k_)
            for q in range(np.uintp(min(pix, p1 - p0) * k_)):
                acc[q] += f[base + q]


_BIAS_GRAD_NCHW = Task(_bias_grad_nchw)
_BIAS_GRAD_NHWC = Task(_bias_grad_nhwc)


def _bias_grad(dy, layout):
    dy = np.ascontiguousarray(dy)
    k = dy.shape[1] if layout == "NCHW" else dy.shape[3]
    if dy.size == 0:
        return np.zeros(k, dtype=dy.dtype)
    if layout == "NCHW":
        db = np.empty(k, dtype=dy.dtype)
        _BIAS_GRAD_NCHW(k, dy, db)
        return db
    pix = max(1, 256 // k)
    partial = np.empty((int(min(dy.size // k // pix + 1, 4 * numba.get_num_threads())), pix * k), dtype=dy.dtype)
    _BIAS_GRAD_NHWC(partial.shape[0], dy, partial, pix)
    return partial.reshape(-1, k).sum(axis=0)


def conv2d_backward(grad_output, x, weight, *, stride=1, padding=0, dilation=1, groups=1,
                    padding_mode="zeros", layout="NCHW", weight_layout=None,
                    input_grad=True, weight_grad=True, bias_grad=True):
    """Gradients of ``numbaconv.conv2d`` w.r.t. its input, weight and bias.

    ``grad_output`` is the gradient of the loss w.r.t. ``conv2d(x, weight, ...)`` (its shape,
    in ``layout``); every other argument is exactly as given to :func:`numbaconv.conv2d`.
    Returns ``(grad_x, grad_weight, grad_bias)``: ``grad_x`` like ``x`` (C-contiguous, in
    ``layout``), ``grad_weight`` like ``weight`` (in ``weight_layout``), ``grad_bias`` of
    shape ``(K,)``.  A gradient whose flag (``input_grad``, ``weight_grad``, ``bias_grad``)
    is false is not computed and returned as ``None``.

    Device arrays (numba, CuPy, torch CUDA tensors) run numbaconv's CUDA backward kernels
    (:func:`numbaconv.cuda.backward.conv2d_backward_cuda`) and come back as device arrays of
    the same library, as :func:`numbaconv.conv2d` routes them to ``algorithm="cuda"``.
    """
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=padding_mode, layout=layout, weight_layout=weight_layout)
    if any(is_device_array(a) for a in (grad_output, x, weight)):
        if "cuda" not in algorithms():
            raise ValueError("grad_output, x or weight is a device array but the 'cuda' algorithm is not available "
                             "here (install numbaconv[cuda] on a machine with a GPU)")
        from ..cuda.backward import conv2d_backward_cuda  # noqa: PLC0415 -- numba.cuda only when needed

        return conv2d_backward_cuda(grad_output, x, weight, need=(bool(input_grad), bool(weight_grad),
                                                                  bool(bias_grad)), **geometry)
    p, dx, dwt, db = _backward_all(grad_output, x, weight, geometry, bool(input_grad), bool(weight_grad),
                               bool(bias_grad))
    if bias_grad and db is None:
        db = _bias_grad(grad_output, p.layout)
    return dx, dwt, db


def conv2d_backward_input(grad_output, input_shape, weight, *, stride=1, padding=0, dilation=1, groups=1,
                          padding_mode="zeros", layout="NCHW", weight_layout=None):
    """Gradient w.r.t. ``x`` (of shape ``input_shape``, in ``layout``) of ``conv2d(x, weight, ...)``.

    As ``torch.nn.grad.conv2d_input`` (argument order aside).  This is the transposed
    convolution of ``grad_output`` with ``weight``.
    """
    input_shape = _check_shape("input_shape", input_shape)
    check_array("weight", weight)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=padding_mode, layout=layout, weight_layout=weight_layout)
    _, dx, _ = _backward(grad_output, _placeholder(input_shape, weight.dtype), weight, geometry, True, False)
    return dx


def conv2d_backward_weight(grad_output, x, weight_shape, *, stride=1, padding=0, dilation=1, groups=1,
                           padding_mode="zeros", layout="NCHW", weight_layout=None):
    """Gradient w.r.t. ``weight`` (of shape ``weight_shape``, in ``weight_layout``) of ``conv2d(x, weight, ...)``.

    As ``torch.nn.grad.conv2d_weight`` (argument order aside).
    """
    weight_shape = _check_shape("weight_shape", weight_shape)
    check_array("x", x)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=padding_mode, layout=layout, weight_layout=weight_layout)
    _, _, dwt = _backward(grad_output, x, _placeholder(weight_shape, x.dtype), geometry, False, True)
    return dwt


def conv2d_backward_bias(grad_output, *, layout="NCHW"):
    """Gradient w.r.t. ``bias``: ``grad_output`` summed over batch and space -> ``(K,)``."""
    check_array("grad_output", grad_output, ndim=4)
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be one of ('NCHW', 'NHWC'), got {layout!r}")
    return _bias_grad(grad_output, layout)
