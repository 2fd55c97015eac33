"""Grad-weight and grad-bias of dense (or grouped) convolutions with few channels.

The seed notebook's layer (C = K = 3, 1000 x 1000) does ``C*R*S = 27`` multiply-adds per
output value: an im2col GEMM with a 27-long reduction spends its time filling the column
buffer, not in the GEMM.  Like the forward streaming kernel (:func:`numbaconv.cpu.depthwise.
run_streaming`), this one streams the output rows once, in per-thread chunks:

* per output row and (output channel, input channel) pair, the ``R*S`` weight-gradient
  taps are dot products of the ``dy`` row with shifted ``x`` rows -- for 3x3 stride 1 all
  nine in ONE vectorised sweep with nine register accumulators (ten loads per nine FMAs),
  the few border columns per tap separately; other geometries one sweep per tap;
* grad-bias is the sum of the same ``dy`` rows, while they are in L1;
* NHWC rows are first transposed, in cache, to planar rows (``x`` into a ring of the
  ``(R-1)*dil+1`` rows in use, each loaded once), so both layouts share the row code.

Per-thread partial sums are added up at the end of the same parallel region.
"""

import numba
import numpy as np
from numba import prange

from ..cpu._jit import jit, pjit, valid_range
from ..cpu.depthwise import _to_planar

__all__ = ["stream_dw_db", "use_streaming_dw"]


@jit
def _dot(yf, y0, xf, x0, xs, n, t):
    """t + sum_{j < n} yf[y0 + j] * xf[x0 + j*xs]."""
    ys = yf[y0:]
    xo = xf[x0:]
    if xs == 1:
        for j in range(np.uintp(n)):
            t += ys[j] * xo[j]
    else:
        us = np.uintp(xs)
        for j in range(np.uintp(n)):
            t += ys[j] * xo[j * us]
    return t


@jit
def _sweep9(yf, y0, xf, x0, x1, x2, d1, d2, n, acc, a0):
    """acc[a0 + 3r + s] += sum_{j < n} yf[y0 + j] * xf[x_r + j + d_s] (d_0 = 0)."""
    ys = yf[y0:]
    r0 = xf[x0:]
    r1 = xf[x1:]
    r2 = xf[x2:]
    u1 = np.uintp(d1)
    u2 = np.uintp(d2)
    t0, t1, t2 = acc[a0], acc[a0 + 1], acc[a0 + 2]
    t3, t4, t5 = acc[a0 + 3], acc[a0 + 4], acc[a0 + 5]
    t6, t7, t8 = acc[a0 + 6], acc[a0 + 7], acc[a0 + 8]
    for j in range(np.uintp(n)):
        v = ys[j]
        t0 += v * r0[j]
        t1 += v * r0[j + u1]
        t2 += v * r0[j + u2]
        t3 += v * r1[j]
        t4 += v * r1[j + u1]
        t5 += v * r1[j + u2]
        t6 += v * r2[j]
        t7 += v * r2[j + u1]
        t8 += v * r2[j + u2]
    acc[a0], acc[a0 + 1], acc[a0 + 2] = t0, t1, t2
    acc[a0 + 3], acc[a0 + 4], acc[a0 + 5] = t3, t4, t5
    acc[a0 + 6], acc[a0 + 7], acc[a0 + 8] = t6, t7, t8


@jit
def _row(yf, yoff, xf, xoff, acc, bacc, w_, wo_, sw, pl, dw, r_, s_, kg, cg, want_dw, want_db):
    """One output row: ``yoff[k]`` is where row k of ``dy`` starts in ``yf``, ``xoff[c, r]``
    where the input row of tap row ``r`` starts in ``xf`` (-1: in the padding)."""
    k_ = yoff.size
    rs_ = r_ * s_
    nine = r_ == 3 and s_ == 3 and sw == 1
    if nine:  # interior columns: every tap column on real input
        lo, hi = valid_range(-pl, 1, w_, wo_)
        lo2, hi2 = valid_range(2 * dw - pl, 1, w_, wo_)
        lo, hi = max(lo, lo2), min(hi, hi2)
    for k in range(k_):
        y0 = yoff[k]
        if want_db:
            bacc[k] = _rowsum(yf, y0, wo_, bacc[k])
        if not want_dw:
            continue
        g = k // kg
        for cc in range(cg):
            c = g * cg + cc
            a0 = (k * cg + cc) * rs_
            if nine and hi > lo and xoff[c, 0] >= 0 and xoff[c, 1] >= 0 and xoff[c, 2] >= 0:
                _sweep9(yf, y0 + lo, xf, xoff[c, 0] + lo - pl, xoff[c, 1] + lo - pl, xoff[c, 2] + lo - pl,
                        dw, 2 * dw, hi - lo, acc, a0)
                for r in range(3):
                    for s in range(3):
                        off = s * dw - pl
                        l1, h1 = valid_range(off, 1, w_, wo_)
                        t = acc[a0 + 3 * r + s]
                        if lo > l1:
                            t = _dot(yf, y0 + l1, xf, xoff[c, r] + l1 + off, 1, lo - l1, t)
                        if h1 > hi:
                            t = _dot(yf, y0 + hi, xf, xoff[c, r] + hi + off, 1, h1 - hi, t)
                        acc[a0 + 3 * r + s] = t
                continue
            for r in range(r_):
                xo = xoff[c, r]
                if xo < 0:
                    continue
                for s in range(s_):
                    off = s * dw - pl
                    l1, h1 = valid_range(off, sw, w_, wo_)
                    if h1 > l1:
                        acc[a0 + r * s_ + s] = _dot(yf, y0 + l1, xf, xo + l1 * sw + off, sw, h1 - l1,
                                                    acc[a0 + r * s_ + s])


@jit
def _rowsum(yf, y0, n, t):
    ys = yf[y0:]
    for j in range(np.uintp(n)):
        t += ys[j]
    return t


@pjit
def _nchw(x, dy, dwp, dbp, kcrs, db, h_, w_, sh, sw, pt, pl, dh, dw, groups, want_dw, want_db):
    n_, k_, ho_, wo_ = dy.shape
    c_ = x.shape[1] if want_dw else groups
    r_, s_ = kcrs.shape[2], kcrs.shape[3]
    cg = c_ // groups
    kg = k_ // groups
    chunks = dwp.shape[0]
    rows = n_ * ho_
    xf = x.ravel()
    yf = dy.ravel()
    for t in prange(chunks):
        acc = dwp[t].ravel()
        acc[:] = 0
        bacc = dbp[t]
        bacc[:] = 0
        yoff = np.empty(k_, dtype=np.intp)
        xoff = np.empty((c_, r_), dtype=np.intp)
        for row in range(t * rows // chunks, (t + 1) * rows // chunks):
            n = row // ho_
            i = row % ho_
            for k in range(k_):
                yoff[k] = ((n * k_ + k) * ho_ + i) * wo_
            for c in range(c_):
                for r in range(r_):
                    hi = i * sh + r * dh - pt
                    xoff[c, r] = ((n * c_ + c) * h_ + hi) * w_ if 0 <= hi < h_ else -1
            _row(yf, yoff, xf, xoff, acc, bacc, w_, wo_, sw, pl, dw, r_, s_, kg, cg, want_dw, want_db)
    _reduce(dwp, dbp, kcrs, db, want_dw, want_db)


@pjit
def _nhwc(x, dy, dwp, dbp, kcrs, db, h_, w_, sh, sw, pt, pl, dh, dw, groups, want_dw, want_db):
    n_, ho_, wo_, k_ = dy.shape
    c_ = x.shape[3] if want_dw else groups
    r_, s_ = kcrs.shape[2], kcrs.shape[3]
    cg = c_ // groups
    kg = k_ // groups
    chunks = dwp.shape[0]
    rows = n_ * ho_
    rb = (r_ - 1) * dh + 1
    xf = x.ravel()
    yf = dy.ravel()
    for t in prange(chunks):
        acc = dwp[t].ravel()
        acc[:] = 0
        bacc = dbp[t]
        bacc[:] = 0
        yoff = np.empty(k_, dtype=np.intp)
        xoff = np.empty((c_, r_), dtype=np.intp)
        ring = np.empty(c_ * rb * w_ if want_dw else 1, dtype=dy.dtype)
        yrow = np.empty(k_ * wo_, dtype=dy.dtype)
        for k in range(k_):
            yoff[k] = k * wo_
        loaded_n = -1
        loaded_to = 0  # rows [.., loaded_to) of image loaded_n are in the ring
        for row in range(t * rows // chunks, (t + 1) * rows // chunks):
            n = row // ho_
            i = row % ho_
            _to_planar(yf, row * wo_ * k_, wo_, k_, yrow, 0, wo_)
            if want_dw:
                top = i * sh - pt
                if n != loaded_n:
                    loaded_n = n
                    loaded_to = top
                for hi in range(max(max(loaded_to, top), 0), min(top + rb, h_)):
                    _to_planar(xf, (n * h_ + hi) * w_ * c_, w_, c_, ring, (hi % rb) * w_, rb * w_)
                loaded_to = max(loaded_to, top + rb)
                for c in range(c_):
                    for r in range(r_):
                        hi = top + r * dh
                        xoff[c, r] = (c * rb + hi % rb) * w_ if 0 <= hi < h_ else -1
            _row(yrow, yoff, ring, xoff, acc, bacc, w_, wo_, sw, pl, dw, r_, s_, kg, cg, want_dw, want_db)
    _reduce(dwp, dbp, kcrs, db, want_dw, want_db)


@jit
def _reduce(dwp, dbp, kcrs, db, want_dw, want_db):
    """``kcrs`` (K, Cg, R, S) and ``db`` from the per-chunk partials."""
    chunks = dwp.shape[0]
    if want_dw:
        out = kcrs.ravel()
        for q in range(dwp.shape[1]):
            v = dwp[0, q]
            for t in range(1, chunks):
                v += dwp[t, q]
            out[q] = v
    if want_db:
        for k in range(dbp.shape[1]):
            v = dbp[0, k]
            for t in range(1, chunks):
                v += dbp[t, k]
            db[k] = v


def use_streaming_dw(p):
    """Few channels per group (the seed notebook's 3 -> 3): stream instead of im2col + GEMM."""
    return p.cg * p.kg <= 16 and not (p.cg == 1 and p.groups > 1)


def stream_dw_db(p, x, dy, want_dw, want_db):
    """``(dW, db)`` of the zero-padded problem ``p``: ``dW`` OIHW (K, Cg, R, S) for NCHW,
    HWIO (R, S, Cg, K) for NHWC, or ``None`` where not asked for."""
    dtype = p.dtype
    chunks = max(1, min(numba.get_num_threads(), p.n * p.ho))
    dwp = np.empty((chunks, p.k * p.cg * p.r * p.s if want_dw else 1), dtype=dtype)
    dbp = np.empty((chunks, p.k), dtype=dtype)
    kcrs = np.empty((p.k, p.cg, p.r, p.s), dtype=dtype)  # the partials' order
    db = np.empty(p.k, dtype=dtype) if want_db else np.empty(1, dtype=dtype)
    geometry = (p.h, p.w, p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w, p.groups)
    xk = x if want_dw else np.zeros((1, 1, 1, 1), dtype=dtype)
    (_nchw if p.layout == "NCHW" else _nhwc)(xk, dy, dwp, dbp, kcrs, db, *geometry, want_dw, want_db)
    dwt = None
    if want_dw:
        dwt = kcrs if p.layout == "NCHW" else np.ascontiguousarray(kcrs.transpose(2, 3, 1, 0))
    return dwt, (db if want_db else None)
