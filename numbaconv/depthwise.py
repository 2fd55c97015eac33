"""Depthwise convolution (``groups == C``, channel multiplier ``m = K/C >= 1``).

Each output channel ``k`` reads one input channel ``k // m`` through an ``R x S`` filter:
only ``R*S`` multiply-adds per output value, so the problem is bound by memory traffic,
and a GEMM formulation (im2col) or a general direct kernel wastes most of its work.
``tiled`` and ``auto`` dispatch here.

* NHWC: vectorised across channels -- for every output pixel and tap, one unit-stride
  loop over all ``K`` channels ``out[n, i, j, :] += x[n, hi, wi, :] * w[r, s, :]``; the
  pixel's output row (``K`` values) stays in L1 while its ``R*S`` taps accumulate.
* NCHW: vectorised along the output width -- ``out[n, k, i, lo:hi] += w[k, r, s] *
  x[n, k // m, hi, lo*sw + off : ...]`` for every tap, with each tap's column range clipped
  by :func:`~numbaconv._jit.valid_range` (zero padding, never an out-of-bounds read).

No padded copy of the input is made; the bias is the accumulators' initial value.
``prange`` runs over (image x output rows) in NHWC and (image x channel) planes in NCHW.

:func:`run_streaming` is the same idea for dense convolutions with few channels (the seed
notebook's C = K = 3 at 1000 x 1000): too few output channels to fill the tiled
micro-kernel's ``V``-wide vectors, and only ``C*R*S`` multiply-adds per output, so it is
bound by memory.  It streams bands of output rows: every input value is read once from
memory (NHWC rows are first transposed, in cache, to planar rows), every output written
once, and the arithmetic is vectorised along the output width.
"""

import numba
import numpy as np
from numba import prange

from ._jit import jit, pjit, valid_range

__all__ = ["run", "run_streaming"]

# --- shared row pass ---------------------------------------------------------------------------
@jit
def _border_range(lo, hi, wo_):
    """Interior ``[lo, hi)`` or, when empty, ``(wo_, wo_)`` so the border loops cover all."""
    if hi <= lo:
        return wo_, wo_
    return lo, hi


@jit
def _border(o, xr, w, wb, s_, sw, dw, off, w_, first, b, j0, j1):
    """Columns ``[j0, j1)`` of :func:`_pass`, tap by tap with bounds checks (borders)."""
    for j in range(j0, j1):
        acc = b if first else o[j]
        for s in range(s_):
            q = j * sw + s * dw + off
            if 0 <= q < w_:
                acc += w[wb + s] * xr[q]
        o[j] = acc


@jit
def _pass(o, xr, w, wb, s_, sw, dw, off, w_, first, b):
    """One input row ``xr`` into one output row ``o``, all ``s_`` taps of a kernel row:
    ``o[j] (= b +|+=) sum_s w[wb + s] * xr[j*sw + s*dw + off]`` for every ``j``.

    Columns whose taps all read real input go through one vectorised loop (3 taps at once
    when ``s_ == 3``); the few border columns that touch zero padding are done per tap.
    """
    wo_ = o.shape[0]
    # columns valid for every tap: [lo, hi)
    lo, hi = valid_range(off, sw, w_, wo_)
    lo2, hi2 = valid_range(off + (s_ - 1) * dw, sw, w_, wo_)
    lo = max(lo, lo2)
    hi = min(hi, hi2)
    lo, hi = _border_range(lo, hi, wo_)
    _border(o, xr, w, wb, s_, sw, dw, off, w_, first, b, 0, lo)
    _border(o, xr, w, wb, s_, sw, dw, off, w_, first, b, hi, wo_)
    if hi <= lo:
        return
    n = np.uintp(hi - lo)
    ov = o[lo:hi]
    xv = xr[lo * sw + off:]
    if s_ == 3:
        w0, w1, w2 = w[wb], w[wb + 1], w[wb + 2]
        d1 = np.uintp(dw)
        d2 = np.uintp(2 * dw)
        if sw == 1:
            if first:
                for j in range(n):
                    ov[j] = b + w0 * xv[j] + w1 * xv[j + d1] + w2 * xv[j + d2]
            else:
                for j in range(n):
                    ov[j] += w0 * xv[j] + w1 * xv[j + d1] + w2 * xv[j + d2]
        elif sw == 2 and dw == 1:
            u1 = np.uintp(1)
            u2 = np.uintp(2)
            if first:
                for j in range(n):
                    q = j * u2
                    ov[j] = b + w0 * xv[q] + w1 * xv[q + u1] + w2 * xv[q + u2]
            else:
                for j in range(n):
                    q = j * u2
                    ov[j] += w0 * xv[q] + w1 * xv[q + u1] + w2 * xv[q + u2]
        else:
            us = np.uintp(sw)
            if first:
                for j in range(n):
                    q = j * us
                    ov[j] = b + w0 * xv[q] + w1 * xv[q + d1] + w2 * xv[q + d2]
            else:
                for j in range(n):
                    q = j * us
                    ov[j] += w0 * xv[q] + w1 * xv[q + d1] + w2 * xv[q + d2]
    else:
        us = np.uintp(sw)
        if first:
            for j in range(n):
                ov[j] = b
        for s in range(s_):
            ws = w[wb + s]
            xs = xr[lo * sw + off + s * dw:]
            for j in range(n):
                ov[j] += ws * xs[j * us]


@jit
def _pass3(o, x0, x1, x2, w, wb, sw, dw, off, w_, b):
    """Three input rows (a whole 3x3 kernel, weights ``w[wb:wb+9]``) into ``o`` in one
    sweep: ``o[j] = b + sum_{r,s} w[wb + 3r + s] * x_r[j*sw + s*dw + off]`` -- one store per
    output instead of one per kernel row."""
    wo_ = o.shape[0]
    lo, hi = valid_range(off, sw, w_, wo_)
    lo2, hi2 = valid_range(off + 2 * dw, sw, w_, wo_)
    lo, hi = _border_range(max(lo, lo2), min(hi, hi2), wo_)
    for t in range(2):
        j0, j1 = (0, lo) if t == 0 else (hi, wo_)
        _border(o, x0, w, wb, 3, sw, dw, off, w_, True, b, j0, j1)
        _border(o, x1, w, wb + 3, 3, sw, dw, off, w_, False, b, j0, j1)
        _border(o, x2, w, wb + 6, 3, sw, dw, off, w_, False, b, j0, j1)
    if hi <= lo:
        return
    n = np.uintp(hi - lo)
    ov = o[lo:hi]
    q0 = lo * sw + off
    a = x0[q0:]
    c = x1[q0:]
    e = x2[q0:]
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = (w[wb], w[wb + 1], w[wb + 2], w[wb + 3], w[wb + 4], w[wb + 5],
                                          w[wb + 6], w[wb + 7], w[wb + 8])
    d1 = np.uintp(dw)
    d2 = np.uintp(2 * dw)
    if sw == 1:
        for j in range(n):
            ov[j] = (b + w0 * a[j] + w1 * a[j + d1] + w2 * a[j + d2] + w3 * c[j] + w4 * c[j + d1]
                     + w5 * c[j + d2] + w6 * e[j] + w7 * e[j + d1] + w8 * e[j + d2])
    elif sw == 2 and dw == 1:
        u1 = np.uintp(1)
        u2 = np.uintp(2)
        for j in range(n):
            q = j * u2
            ov[j] = (b + w0 * a[q] + w1 * a[q + u1] + w2 * a[q + u2] + w3 * c[q] + w4 * c[q + u1]
                     + w5 * c[q + u2] + w6 * e[q] + w7 * e[q + u1] + w8 * e[q + u2])
    else:
        us = np.uintp(sw)
        for j in range(n):
            q = j * us
            ov[j] = (b + w0 * a[q] + w1 * a[q + d1] + w2 * a[q + d2] + w3 * c[q] + w4 * c[q + d1]
                     + w5 * c[q + d2] + w6 * e[q] + w7 * e[q + d1] + w8 * e[q + d2])


# --- NCHW depthwise ----------------------------------------------------------------------------
@jit
def _plane_nchw(x, w_krs, bias, out, n, k, sh, sw, pt, pl, dh, dw, m):
    """Output plane ``out[n, k]``: row by row, one :func:`_pass` per valid kernel row."""
    h_, w_ = x.shape[2], x.shape[3]
    r_, s_ = w_krs.shape[1], w_krs.shape[2]
    ho_ = out.shape[2]
    c = k // m
    b = bias[k]
    wk = w_krs[k].ravel()
    xc = x[n, c]
    if r_ == 3 and s_ == 3 and sh == 1 and sw == 1 and out.shape[3] == w_:
        _plane_flat(xc, wk, b, out[n, k], pt, pl, dh, dw)
        return
    for i in range(ho_):
        o = out[n, k, i]
        h0 = i * sh - pt
        if r_ == 3 and s_ == 3 and h0 >= 0 and h0 + 2 * dh < h_:
            _pass3(o, xc[h0], xc[h0 + dh], xc[h0 + 2 * dh], wk, 0, sw, dw, -pl, w_, b)
            continue
        first = True
        for r in range(r_):
            hi = i * sh + r * dh - pt
            if hi < 0 or hi >= h_:
                continue
            _pass(o, xc[hi], wk, r * s_, s_, sw, dw, -pl, w_, first, b)
            first = False
        if first:
            o[:] = b


@jit
def _plane_flat(xc, wk, b, o, pt, pl, dh, dw):
    """Stride 1, 3x3, ``Wo == W``: the interior rows of plane ``o`` as ONE flat loop.

    With output rows as long as input rows, ``out[i, j]`` reads ``x`` at the flat offset
    ``(i*W + j) + (r*dh - pt)*W + s*dw - pl`` -- a fixed shift per tap -- so all interior
    rows are one long vectorised sweep (no per-row loop overhead or scalar remainders).
    The border columns it computes wrong (their taps wrap into the neighbouring row) are
    recomputed afterwards (with the top and bottom rows, by a scalar bounds-checked loop),
    and nothing outside ``x`` is read."""
    h_, w_ = xc.shape
    ho_ = o.shape[0]
    i0 = pt  # first row whose three taps are real rows
    i1 = min(ho_, h_ - 2 * dh + pt)
    xf = xc.ravel()
    if i1 <= i0:
        i1 = i0 = 0
    of = o.ravel()
    pr = 2 * dw - pl
    q0 = i0 * w_ + max(0, pl)
    q1 = i1 * w_ - max(0, pr)
    base = q0 - pt * w_ - pl  # x offset of tap (0, 0) at q0: >= 0
    if i1 > i0 and q1 > q0:
        xs = xf[base:]
        os_ = of[q0:q1]
        uw = np.uintp(w_)
        d1 = np.uintp(dw)
        d2 = np.uintp(2 * dw)
        r1 = np.uintp(dh) * uw
        r2 = r1 + r1
        w0, w1, w2, w3, w4, w5, w6, w7, w8 = wk[0], wk[1], wk[2], wk[3], wk[4], wk[5], wk[6], wk[7], wk[8]
        for q in range(np.uintp(q1 - q0)):
            os_[q] = (b + w0 * xs[q] + w1 * xs[q + d1] + w2 * xs[q + d2]
                      + w3 * xs[q + r1] + w4 * xs[q + r1 + d1] + w5 * xs[q + r1 + d2]
                      + w6 * xs[q + r2] + w7 * xs[q + r2 + d1] + w8 * xs[q + r2 + d2])
    # border columns: taps that fall outside the row
    lo, hi = valid_range(-pl, 1, w_, w_)
    lo2, hi2 = valid_range(2 * dw - pl, 1, w_, w_)
    lo, hi = _border_range(max(lo, lo2), min(hi, hi2), w_)
    lo = min(lo, w_)
    nb = lo + (w_ - hi)
    for i in range(ho_):
        h0 = i - pt
        inner = i0 <= i < i1
        for t in range(nb if inner else w_):
            j = t if (t < lo or not inner) else hi + t - lo
            acc = b
            for r in range(3):
                hr = h0 + r * dh
                if hr < 0 or hr >= h_:
                    continue
                xb = hr * w_
                for s in range(3):
                    wi = j + s * dw - pl
                    if 0 <= wi < w_:
                        acc += wk[3 * r + s] * xf[xb + wi]
            of[i * w_ + j] = acc


@pjit
def _dw_nchw(x, w_krs, bias, out, sh, sw, pt, pl, dh, dw, m):
    n_, k_ = out.shape[0], out.shape[1]
    for t in prange(n_ * k_):
        _plane_nchw(x, w_krs, bias, out, t // k_, t % k_, sh, sw, pt, pl, dh, dw, m)


# --- NHWC depthwise ----------------------------------------------------------------------------
@jit
def _row_nhwc(x, w_rsk, bias, out, n, i, sh, sw, pt, pl, dh, dw, m, wt, pix):
    """Output row ``out[n, i, :, :]``, vectorised across channels.

    Multiplier 1, 3x3, interior pixel: one loop over the channels with all 9 taps (18
    loads, 9 FMAs, 1 store per vector).  Other pixels (borders, other kernels, m > 1):
    tap by tap into the output pixel, which stays in L1.
    """
    h_, w_ = x.shape[1], x.shape[2]
    r_, s_, k_ = w_rsk.shape
    wo_ = out.shape[2]
    c_ = k_ // m
    xf = x.ravel()
    wf = w_rsk.ravel()
    of = out.ravel()
    uk = np.uintp(k_)
    rows_ok = True
    for r in range(r_):
        hi = i * sh + r * dh - pt
        if hi < 0 or hi >= h_:
            rows_ok = False
    h0 = i * sh - pt
    j = 0
    if pix > 1 and m == 1 and r_ == 3 and s_ == 3 and rows_ok and sw == 1:
        # stride 1: ``pix`` consecutive pixels x all channels are one contiguous run in x
        # and out, so one long vectorised loop covers them (weights and bias tiled ``pix``
        # times in ``wt``): no per-pixel loop overhead for few channels.
        j = max(0, pl)  # first pixel whose taps all read real input
        run = np.uintp(pix * k_)
        ds = np.uintp(dw * c_)
        dr = np.uintp(dh * w_ * c_)
        while j + pix <= wo_ and j + pix - 1 - pl + 2 * dw < w_:
            ob = np.uintp(((n * out.shape[1] + i) * wo_ + j) * k_)
            xb = np.uintp(((n * h_ + h0) * w_ + j - pl) * c_)
            x1 = xb + ds
            x2 = x1 + ds
            x3 = xb + dr
            x4 = x3 + ds
            x5 = x4 + ds
            x6 = x3 + dr
            x7 = x6 + ds
            x8 = x7 + ds
            for q in range(run):
                of[ob + q] = (wt[9 * run + q] + xf[xb + q] * wt[q] + xf[x1 + q] * wt[run + q]
                              + xf[x2 + q] * wt[2 * run + q] + xf[x3 + q] * wt[3 * run + q]
                              + xf[x4 + q] * wt[4 * run + q] + xf[x5 + q] * wt[5 * run + q]
                              + xf[x6 + q] * wt[6 * run + q] + xf[x7 + q] * wt[7 * run + q]
                              + xf[x8 + q] * wt[8 * run + q])
            j += pix
        # pixels [0, max(0, pl)) and the tail go pixel by pixel below
        _row_nhwc_pixels(x, w_rsk, bias, out, n, i, sh, sw, pt, pl, dh, dw, m, 0, max(0, pl), rows_ok)
    _row_nhwc_pixels(x, w_rsk, bias, out, n, i, sh, sw, pt, pl, dh, dw, m, j, wo_, rows_ok)


@jit
def _row_nhwc_pixels(x, w_rsk, bias, out, n, i, sh, sw, pt, pl, dh, dw, m, j0, j1, rows_ok):
    """Pixels ``[j0, j1)`` of output row ``i``, one at a time."""
    h_, w_ = x.shape[1], x.shape[2]
    r_, s_, k_ = w_rsk.shape
    wo_ = out.shape[2]
    c_ = k_ // m
    xf = x.ravel()
    wf = w_rsk.ravel()
    of = out.ravel()
    uk = np.uintp(k_)
    h0 = i * sh - pt
    for j in range(j0, j1):
        ob = np.uintp(((n * out.shape[1] + i) * wo_ + j) * k_)
        w0 = j * sw - pl
        if m == 1 and r_ == 3 and s_ == 3 and rows_ok and w0 >= 0 and w0 + 2 * dw < w_:
            xb = np.uintp(((n * h_ + h0) * w_ + w0) * c_)
            ds = np.uintp(dw * c_)
            dr = np.uintp(dh * w_ * c_)
            x0 = xb
            x1 = xb + ds
            x2 = xb + ds + ds
            x3 = xb + dr
            x4 = x3 + ds
            x5 = x4 + ds
            x6 = x3 + dr
            x7 = x6 + ds
            x8 = x7 + ds
            for k in range(uk):
                of[ob + k] = (bias[k] + xf[x0 + k] * wf[k] + xf[x1 + k] * wf[uk + k]
                              + xf[x2 + k] * wf[2 * uk + k] + xf[x3 + k] * wf[3 * uk + k]
                              + xf[x4 + k] * wf[4 * uk + k] + xf[x5 + k] * wf[5 * uk + k]
                              + xf[x6 + k] * wf[6 * uk + k] + xf[x7 + k] * wf[7 * uk + k]
                              + xf[x8 + k] * wf[8 * uk + k])
            continue
        for k in range(uk):
            of[ob + k] = bias[k]
        for r in range(r_):
            hi = h0 + r * dh
            if hi < 0 or hi >= h_:
                continue
            for s in range(s_):
                wi = w0 + s * dw
                if wi < 0 or wi >= w_:
                    continue
                xb = np.uintp(((n * h_ + hi) * w_ + wi) * c_)
                wb = np.uintp((r * s_ + s) * k_)
                if m == 1:
                    for k in range(uk):
                        of[ob + k] += xf[xb + k] * wf[wb + k]
                else:
                    for c in range(c_):
                        xc = xf[xb + np.uintp(c)]
                        for q in range(m):
                            kk = np.uintp(c * m + q)
                            of[ob + kk] += xc * wf[wb + kk]


@pjit
def _dw_nhwc(x, w_rsk, bias, out, sh, sw, pt, pl, dh, dw, m, wt, pix):
    n_, ho_ = out.shape[0], out.shape[1]
    for t in prange(n_ * ho_):
        _row_nhwc(x, w_rsk, bias, out, t // ho_, t % ho_, sh, sw, pt, pl, dh, dw, m, wt, pix)


_ZERO_BIAS = {}


def _bias(p, bias):
    """``bias`` or a cached read-only zero vector (no allocation per call)."""
    if bias is not None:
        return bias
    key = (p.k, np.dtype(p.dtype).str)
    b = _ZERO_BIAS.get(key)
    if b is None:
        b = np.zeros(p.k, dtype=p.dtype)
        _ZERO_BIAS[key] = b
    return b


def run(p, x, w_oihw, bias, out):
    """Depthwise ``p`` (``p.groups == p.c``): same contract as every algorithm's ``run``."""
    m = p.k // p.c
    b = _bias(p, bias)
    geometry = (p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w, m)
    if p.layout == "NHWC":
        w_rsk = np.ascontiguousarray(w_oihw[:, 0].transpose(1, 2, 0))
        # pixels per contiguous run of the stride-1 fast path: ~256 values per vector loop
        pix = max(1, min(p.wo, 256 // p.k)) if (m == 1 and p.stride_w == 1 and p.r == 3 and p.s == 3) else 1
        if pix > 1:
            wt = np.empty((10, pix, p.k), dtype=p.dtype)
            wt[:9] = w_rsk.reshape(9, 1, p.k)
            wt[9] = b
            wt = wt.ravel()
        else:
            wt = np.zeros(1, dtype=p.dtype)
        _dw_nhwc(x, w_rsk, b, out, *geometry, wt, pix)
    else:
        _dw_nchw(x, np.ascontiguousarray(w_oihw[:, 0]), b, out, *geometry)


# --- streaming kernel for few-channel dense problems ------------------------------------------
@pjit
def _stream_nchw(x, w, bias, out, sh, sw, pt, pl, dh, dw, groups):
    n_, k_, ho_ = out.shape[0], out.shape[1], out.shape[2]
    cg, r_, s_ = w.shape[1], w.shape[2], w.shape[3]
    h_, w_ = x.shape[2], x.shape[3]
    kg = k_ // groups
    for t in prange(n_ * ho_):
        n = t // ho_
        i = t % ho_
        for k in range(k_):
            g = k // kg
            o = out[n, k, i]
            wk = w[k].ravel()
            b = bias[k]
            first = True
            for cc in range(cg):
                xc = x[n, g * cg + cc]
                for r in range(r_):
                    hi = i * sh + r * dh - pt
                    if hi < 0 or hi >= h_:
                        continue
                    _pass(o, xc[hi], wk, (cc * r_ + r) * s_, s_, sw, dw, -pl, w_, first, b)
                    first = False
            if first:
                o[:] = b


@jit
def _load_row_planar(x, n, hi, ring, slot):
    """``ring[c, slot, :] = x[n, hi, :, c]`` (NHWC row to planar), 3 channels unrolled."""
    w_, c_ = x.shape[2], x.shape[3]
    xr = x[n, hi].ravel()
    if c_ == 3:
        r0 = ring[0, slot]
        r1 = ring[1, slot]
        r2 = ring[2, slot]
        u1 = np.uintp(1)
        u2 = np.uintp(2)
        u3 = np.uintp(3)
        for j in range(np.uintp(w_)):
            q = j * u3
            r0[j] = xr[q]
            r1[j] = xr[q + u1]
            r2[j] = xr[q + u2]
    else:
        uc = np.uintp(c_)
        for c in range(c_):
            rc = ring[c, slot]
            xs = xr[c:]
            for j in range(np.uintp(w_)):
                rc[j] = xs[j * uc]


@jit
def _store_row_interleaved(acc, orow):
    """``orow[j * K + k] = acc[k, j]`` (planar to NHWC row), 3 channels unrolled."""
    k_, wo_ = acc.shape[0], orow.shape[0] // acc.shape[0]
    if k_ == 3:
        a0 = acc[0]
        a1 = acc[1]
        a2 = acc[2]
        u1 = np.uintp(1)
        u2 = np.uintp(2)
        u3 = np.uintp(3)
        for j in range(np.uintp(wo_)):
            q = j * u3
            orow[q] = a0[j]
            orow[q + u1] = a1[j]
            orow[q + u2] = a2[j]
    else:
        uk = np.uintp(k_)
        for k in range(k_):
            ak = acc[k]
            os_ = orow[k:]
            for j in range(np.uintp(wo_)):
                os_[j * uk] = ak[j]


@jit
def _stream_nhwc_rows(x, w, bias, out, i0, i1, sh, sw, pt, pl, dh, dw, groups):
    """Output rows ``t in [i0, i1)`` (over ``n * Ho``) of an NHWC problem: each input row is
    transposed once into a ring of planar rows, computed planar, written back interleaved."""
    n_, ho_, wo_, k_ = out.shape
    cg, r_, s_ = w.shape[1], w.shape[2], w.shape[3]
    h_, w_, c_ = x.shape[1], x.shape[2], x.shape[3]
    kg = k_ // groups
    rb = (r_ - 1) * dh + 1
    ring = np.empty((c_, rb, w_), dtype=x.dtype)
    acc = np.empty((k_, wo_), dtype=out.dtype)
    loaded_n = -1
    loaded_to = 0  # rows [.., loaded_to) of image loaded_n are in the ring
    for t in range(i0, i1):
        n = t // ho_
        i = t % ho_
        top = i * sh - pt
        if n != loaded_n:
            loaded_n = n
            loaded_to = top
        start = max(loaded_to, top)
        for hi in range(max(start, 0), min(top + rb, h_)):
            _load_row_planar(x, n, hi, ring, hi % rb)
        loaded_to = max(loaded_to, top + rb)
        for k in range(k_):
            g = k // kg
            o = acc[k]
            wk = w[k].ravel()
            b = bias[k]
            first = True
            for cc in range(cg):
                c = g * cg + cc
                for r in range(r_):
                    hi = top + r * dh
                    if hi < 0 or hi >= h_:
                        continue
                    _pass(o, ring[c, hi % rb], wk, (cc * r_ + r) * s_, s_, sw, dw, -pl, w_, first, b)
                    first = False
            if first:
                o[:] = b
        _store_row_interleaved(acc, out[n, i].ravel())


@pjit
def _stream_nhwc(x, w, bias, out, sh, sw, pt, pl, dh, dw, groups, chunks):
    rows = out.shape[0] * out.shape[1]
    for t in prange(chunks):
        _stream_nhwc_rows(x, w, bias, out, t * rows // chunks, (t + 1) * rows // chunks,
                          sh, sw, pt, pl, dh, dw, groups)


def run_streaming(p, x, w_oihw, bias, out):
    """Few-channel dense (or grouped) ``p``: same contract as every algorithm's ``run``."""
    b = _bias(p, bias)
    w = np.ascontiguousarray(w_oihw)
    if p.layout == "NCHW":
        _stream_nchw(x, w, b, out, p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w,
                     p.groups)
    else:
        chunks = max(1, min(p.n * p.ho, 4 * numba.get_num_threads()))
        _stream_nhwc(x, w, b, out, p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w,
                     p.groups, chunks)
