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

import numpy as np
from numba import prange

from ._jit import jit, pjit, valid_range

__all__ = ["run", "run_streaming"]


@jit
def _row_nhwc(x, w_rsk, bias, out, n, i, sh, sw, pt, pl, dh, dw, m):
    """Output row ``out[n, i, :, :]``."""
    h_, w_ = x.shape[1], x.shape[2]
    r_, s_, k_ = w_rsk.shape
    wo_ = out.shape[2]
    c_ = k_ // m
    for j in range(wo_):
        o = out[n, i, j]
        for k in range(k_):
            o[k] = bias[k]
        for r in range(r_):
            hi = i * sh + r * dh - pt
            if hi < 0 or hi >= h_:
                continue
            for s in range(s_):
                wi = j * sw + s * dw - pl
                if wi < 0 or wi >= w_:
                    continue
                xv = x[n, hi, wi]
                wv = w_rsk[r, s]
                if m == 1:
                    for k in range(k_):
                        o[k] += xv[k] * wv[k]
                else:
                    for c in range(c_):
                        xc = xv[c]
                        for q in range(m):
                            o[c * m + q] += xc * wv[c * m + q]


@pjit
def _dw_nhwc(x, w_rsk, bias, out, sh, sw, pt, pl, dh, dw, m):
    n_, ho_ = out.shape[0], out.shape[1]
    for t in prange(n_ * ho_):
        _row_nhwc(x, w_rsk, bias, out, t // ho_, t % ho_, sh, sw, pt, pl, dh, dw, m)


@jit
def _plane_nchw(x, w_krs, bias, out, n, k, sh, sw, pt, pl, dh, dw, m):
    """Output plane ``out[n, k]``."""
    h_, w_ = x.shape[2], x.shape[3]
    r_, s_ = w_krs.shape[1], w_krs.shape[2]
    ho_, wo_ = out.shape[2], out.shape[3]
    c = k // m
    b = bias[k]
    for i in range(ho_):
        o = out[n, k, i]
        for j in range(wo_):
            o[j] = b
        for r in range(r_):
            hi = i * sh + r * dh - pt
            if hi < 0 or hi >= h_:
                continue
            xr = x[n, c, hi]
            for s in range(s_):
                wv = w_krs[k, r, s]
                off = s * dw - pl
                lo, hi_j = valid_range(off, sw, w_, wo_)
                _axpy(o, xr, wv, lo, hi_j, sw, off)


@pjit
def _dw_nchw(x, w_krs, bias, out, sh, sw, pt, pl, dh, dw, m):
    n_, k_ = out.shape[0], out.shape[1]
    for t in prange(n_ * k_):
        _plane_nchw(x, w_krs, bias, out, t // k_, t % k_, sh, sw, pt, pl, dh, dw, m)


def run(p, x, w_oihw, bias, out):
    """Depthwise ``p`` (``p.groups == p.c``): same contract as every algorithm's ``run``."""
    m = p.k // p.c
    b = np.zeros(p.k, dtype=p.dtype) if bias is None else bias
    geometry = (p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w, m)
    if p.layout == "NHWC":
        w_rsk = np.ascontiguousarray(w_oihw[:, 0].transpose(1, 2, 0))
        _dw_nhwc(x, w_rsk, b, out, *geometry)
    else:
        _dw_nchw(x, np.ascontiguousarray(w_oihw[:, 0]), b, out, *geometry)


# --- streaming kernel for few-channel dense problems ------------------------------------------
@jit
def _axpy(a, xr, wv, lo, hi, sw, off):
    """``a[lo:hi] += wv * xr[lo*sw + off : hi*sw + off : sw]`` -- a separate function so
    LLVM vectorises it on its own (inside the big loop nest it did not)."""
    if hi <= lo:
        return
    n = hi - lo
    av = a[lo:hi]
    xv = xr[lo * sw + off:]  # non-negative indices from here: no wraparound selects
    if sw == 1:
        for j in range(n):
            av[j] += xv[j] * wv
    else:
        for j in range(n):
            av[j] += xv[j * sw] * wv


@jit
def _stream_band(x, w, bias, out, n, i0, i1, nchw, sh, sw, pt, pl, dh, dw, groups, xbuf, acc):
    """Output rows ``[i0, i1)`` of image ``n``, every output channel."""
    k_, cg, r_, s_ = w.shape
    if nchw:
        c_, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
        wo_ = out.shape[3]
    else:
        h_, w_, c_ = x.shape[1], x.shape[2], x.shape[3]
        wo_ = out.shape[2]
    kg = k_ // groups
    hlo = i0 * sh - pt
    if not nchw:  # planar copy of the band's input rows: xbuf[c, row - hlo, :]
        for t in range(xbuf.shape[1]):
            hi = hlo + t
            if hi < 0 or hi >= h_:
                continue
            for j in range(w_):
                for c in range(c_):
                    xbuf[c, t, j] = x[n, hi, j, c]
    for i in range(i0, i1):
        for k in range(k_):
            g = k // kg
            a = acc[k]
            b = bias[k]
            for j in range(wo_):
                a[j] = b
            for cc in range(cg):
                c = g * cg + cc
                for r in range(r_):
                    hi = i * sh + r * dh - pt
                    if hi < 0 or hi >= h_:
                        continue
                    if nchw:
                        xr = x[n, c, hi]
                    else:
                        xr = xbuf[c, hi - hlo]
                    for s in range(s_):
                        wv = w[k, cc, r, s]
                        off = s * dw - pl
                        lo, hi_j = valid_range(off, sw, w_, wo_)
                        _axpy(a, xr, wv, lo, hi_j, sw, off)
        if nchw:
            for k in range(k_):
                out[n, k, i, :] = acc[k, :wo_]
        else:
            for j in range(wo_):
                for k in range(k_):
                    out[n, i, j, k] = acc[k, j]


@pjit
def _stream(x, w, bias, out, nchw, sh, sw, pt, pl, dh, dw, groups, band, band_rows):
    n_ = out.shape[0]
    k_ = w.shape[0]
    if nchw:
        c_, w_, ho_, wo_ = x.shape[1], x.shape[3], out.shape[2], out.shape[3]
    else:
        c_, w_, ho_, wo_ = x.shape[3], x.shape[2], out.shape[1], out.shape[2]
    nb = (ho_ + band - 1) // band
    for t in prange(n_ * nb):
        n = t // nb
        i0 = (t % nb) * band
        xbuf = np.empty((c_, band_rows if not nchw else 0, w_), dtype=out.dtype)
        acc = np.empty((k_, wo_), dtype=out.dtype)
        _stream_band(x, w, bias, out, n, i0, min(i0 + band, ho_), nchw, sh, sw, pt, pl, dh, dw, groups,
                     xbuf, acc)


def run_streaming(p, x, w_oihw, bias, out):
    """Few-channel dense (or grouped) ``p``: same contract as every algorithm's ``run``."""
    import numba
    b = np.zeros(p.k, dtype=p.dtype) if bias is None else bias
    threads = numba.get_num_threads()
    band = max(1, min(16, -(-p.n * p.ho // (8 * threads))))
    band_rows = (band - 1) * p.stride_h + (p.r - 1) * p.dil_h + 1
    _stream(x, w_oihw, b, out, p.layout == "NCHW", p.stride_h, p.stride_w, p.pad_top, p.pad_left,
            p.dil_h, p.dil_w, p.groups, band, band_rows)
