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
  by :func:`~numbaconv.cpu._jit.valid_range` (zero padding, never an out-of-bounds read),
  or through zero-padded stride-phase copies of each plane.  Small 3x3 planes (MobileNet's
  7x7-28x28; rows too short for vectors along them) go through blocks of channels instead:
  transposed into a channels-last copy in cache, the NHWC register blocks, and back.

No padded copy of the input is made; the bias is the accumulators' initial value.
Each kernel is a serial task over a range of (image x output rows) in NHWC and (image x
channel) planes in NCHW, run in parallel by :class:`numbaconv.cpu._launch.Task` (no
``prange`` driver to compile per kernel: first-call latency).

:func:`run_streaming` is the same idea for dense convolutions with few channels (the seed
notebook's C = K = 3 at 1000 x 1000): too few output channels to fill the tiled
micro-kernel's ``V``-wide vectors, and only ``C*R*S`` multiply-adds per output, so it is
bound by memory.  It streams bands of output rows: every input value is read once from
memory (NHWC rows are first transposed, in cache, to planar rows), every output written
once, and the arithmetic is vectorised along the output width.
"""

import functools

import numba
import numpy as np

from ._blocking import block_width, transpose_block
from ._jit import jit, move_run, scratch, valid_range, zero_run
from ._launch import Task, call_at, callee, type_key
from ._vec import channel_taps, conv_block, dw3x3_block, lanes, strided_runs, tap_sweep, target_vector_bytes
from .epilogue import NONE, after, arg_key, finish_2d

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
    _border(o, xr, w, wb, s_, sw, dw, off, w_, first, b, np.int64(0), lo)
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
    elif sw == 1:
        # unit stride: taps five (or three) per sweep, so the output row is read and written
        # once per sweep instead of once per tap, and each loop vectorises (a runtime stride
        # in the index kept the general loop below scalar: 5x5 single-channel ran ~20 GFLOP/s)
        if first:
            for j in range(n):
                ov[j] = b
        d1 = np.uintp(dw)
        d2 = np.uintp(2 * dw)
        d3 = np.uintp(3 * dw)
        d4 = np.uintp(4 * dw)
        s = 0
        while s + 5 <= s_:
            w0, w1, w2, w3, w4 = w[wb + s], w[wb + s + 1], w[wb + s + 2], w[wb + s + 3], w[wb + s + 4]
            xs = xr[lo + off + s * dw:]
            for j in range(n):
                ov[j] += w0 * xs[j] + w1 * xs[j + d1] + w2 * xs[j + d2] + w3 * xs[j + d3] + w4 * xs[j + d4]
            s += 5
        while s + 3 <= s_:
            w0, w1, w2 = w[wb + s], w[wb + s + 1], w[wb + s + 2]
            xs = xr[lo + off + s * dw:]
            for j in range(n):
                ov[j] += w0 * xs[j] + w1 * xs[j + d1] + w2 * xs[j + d2]
            s += 3
        while s < s_:
            ws = w[wb + s]
            xs = xr[lo + off + s * dw:]
            for j in range(n):
                ov[j] += ws * xs[j]
            s += 1
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
def _pass3(o, x0, x1, x2, w, wb, sw, dw, off, w_, b, first=True):
    """Three input rows (a whole 3x3 kernel, weights ``w[wb:wb+9]``) into ``o`` in one
    sweep: ``o[j] = b + sum_{r,s} w[wb + 3r + s] * x_r[j*sw + s*dw + off]`` -- one store per
    output instead of one per kernel row."""
    wo_ = o.shape[0]
    lo, hi = valid_range(off, sw, w_, wo_)
    lo2, hi2 = valid_range(off + 2 * dw, sw, w_, wo_)
    lo, hi = _border_range(max(lo, lo2), min(hi, hi2), wo_)
    # (typed arguments, not literals: every call shares one compile of _border)
    s3 = np.int64(3)
    acc = np.bool_(False)
    for t in range(2):
        j0, j1 = (0, lo) if t == 0 else (hi, wo_)
        _border(o, x0, w, wb, s3, sw, dw, off, w_, first, b, j0, j1)
        _border(o, x1, w, wb + 3, s3, sw, dw, off, w_, acc, b, j0, j1)
        _border(o, x2, w, wb + 6, s3, sw, dw, off, w_, acc, b, j0, j1)
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
    if not first:  # accumulate: the output row is the "bias"
        if sw == 1:
            for j in range(n):
                ov[j] += (w0 * a[j] + w1 * a[j + d1] + w2 * a[j + d2] + w3 * c[j] + w4 * c[j + d1]
                          + w5 * c[j + d2] + w6 * e[j] + w7 * e[j + d1] + w8 * e[j + d2])
        else:
            us = np.uintp(sw)
            for j in range(n):
                q = j * us
                ov[j] += (w0 * a[q] + w1 * a[q + d1] + w2 * a[q + d2] + w3 * c[q] + w4 * c[q + d1]
                          + w5 * c[q + d2] + w6 * e[q] + w7 * e[q + d1] + w8 * e[q + d2])
    elif sw == 1:
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
    if r_ == 3 and s_ == 3:
        _plane3x3(xc, wk, b, out[n, k], sh, sw, pt, pl, dh, dw)
        return
    for i in range(ho_):
        o = out[n, k, i]
        first = np.bool_(True)  # (not a literal: no second compile of _pass for it)
        for r in range(r_):
            hi = i * sh + r * dh - pt
            if hi < 0 or hi >= h_:
                continue
            _pass(o, xc[hi], wk, r * s_, s_, sw, dw, -pl, w_, first, b)
            first = False
        if first:  # (no kernel row inside the image)
            for j in range(o.shape[0]):
                o[j] = b


@jit
def _plane3x3(xc, wk, b, o, sh, sw, pt, pl, dh, dw):
    """A whole 3x3 output plane ``o`` from input plane ``xc`` (flat indices, no views or
    calls in the loops: per-call overhead, not arithmetic, dominated at these sizes).

    * Stride 1 with ``Wo == W``: ``out[i, j]`` reads ``x`` at the flat offset
      ``(i*W + j) + (r*dh - pt)*W + s*dw - pl`` -- a fixed shift per tap -- so all
      interior rows are ONE long vectorised 9-tap sweep (no per-row overhead or scalar
      remainders).  The border columns it computes wrong (their taps wrap into the
      neighbouring row) are recomputed below.
    * Otherwise: one 9-tap sweep per interior row over its interior columns (stride-2
      loads deinterleaved by LLVM).
    * Border rows and columns (taps in the zero padding): a scalar bounds-checked loop.
    Nothing outside ``x`` is read.
    """
    h_, w_ = xc.shape
    ho_, wo_ = o.shape
    xf = xc.ravel()
    of = o.ravel()
    # interior rows [i0, i1): all three taps on real rows
    i0 = (pt + sh - 1) // sh
    i1 = min(ho_, (h_ - 1 - 2 * dh + pt) // sh + 1) if h_ - 1 - 2 * dh + pt >= 0 else 0
    if i1 <= i0:
        i0 = i1 = 0
    # interior columns [lo, hi)
    lo, hi = valid_range(-pl, sw, w_, wo_)
    lo2, hi2 = valid_range(2 * dw - pl, sw, w_, wo_)
    lo, hi = _border_range(max(lo, lo2), min(hi, hi2), wo_)
    lo = min(lo, wo_)
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = wk[0], wk[1], wk[2], wk[3], wk[4], wk[5], wk[6], wk[7], wk[8]
    d1 = np.uintp(dw)
    d2 = np.uintp(2 * dw)
    r1 = np.uintp(dh) * np.uintp(w_)
    r2 = r1 + r1
    if i1 > i0 and sh == 1 and sw == 1 and wo_ == w_:
        q0 = i0 * w_ + max(0, pl)
        q1 = i1 * w_ - max(0, 2 * dw - pl)
        if q1 > q0:
            xs = xf[q0 - pt * w_ - pl:]  # x offset of tap (0, 0) at q0: >= 0
            os_ = of[q0:q1]
            for q in range(np.uintp(q1 - q0)):
                os_[q] = (b + w0 * xs[q] + w1 * xs[q + d1] + w2 * xs[q + d2]
                          + w3 * xs[q + r1] + w4 * xs[q + r1 + d1] + w5 * xs[q + r1 + d2]
                          + w6 * xs[q + r2] + w7 * xs[q + r2 + d1] + w8 * xs[q + r2 + d2])
    elif hi > lo:
        n = np.uintp(hi - lo)
        for i in range(i0, i1):
            xb = np.uintp((i * sh - pt) * w_ + lo * sw - pl)
            ob = np.uintp(i * wo_ + lo)
            if sw == 2 and dw == 1:
                u1 = np.uintp(1)
                u2 = np.uintp(2)
                for j in range(n):
                    q = xb + j * u2
                    of[ob + j] = (b + w0 * xf[q] + w1 * xf[q + u1] + w2 * xf[q + u2]
                                  + w3 * xf[q + r1] + w4 * xf[q + r1 + u1] + w5 * xf[q + r1 + u2]
                                  + w6 * xf[q + r2] + w7 * xf[q + r2 + u1] + w8 * xf[q + r2 + u2])
            else:
                us = np.uintp(sw)
                for j in range(n):
                    q = xb + j * us
                    of[ob + j] = (b + w0 * xf[q] + w1 * xf[q + d1] + w2 * xf[q + d2]
                                  + w3 * xf[q + r1] + w4 * xf[q + r1 + d1] + w5 * xf[q + r1 + d2]
                                  + w6 * xf[q + r2] + w7 * xf[q + r2 + d1] + w8 * xf[q + r2 + d2])
    # border rows and columns, scalar
    nb = lo + (wo_ - hi)
    for i in range(ho_):
        h0 = i * sh - pt
        inner = i0 <= i < i1
        for t in range(nb if inner else wo_):
            j = t if (t < lo or not inner) else hi + t - lo
            acc = b
            for r in range(3):
                hr = h0 + r * dh
                if hr < 0 or hr >= h_:
                    continue
                xrow = hr * w_
                for s in range(3):
                    wi = j * sw + s * dw - pl
                    if 0 <= wi < w_:
                        acc += wk[3 * r + s] * xf[xrow + wi]
            of[i * wo_ + j] = acc


@jit
def _dw_nchw_phases_tasks(lo, hi, xf, wf, bias, of, offs, geo, epi, fns):
    """Planes ``[lo, hi)`` (over ``N * K``) through stride-phase planes (see :func:`bind`);
    ``geo``: the integers ``C, H, W, K, Ho, Wo, R, S, sh, sw, pt, pl, dh, m, hq, wq`` (one
    array: a launch's arguments are typed one by one on every call).  ``fns``: the
    addresses of :func:`_fill_phases` (or :func:`_fill_unit`) and :func:`_plane_phases` (3x3) or
    :func:`_plane_phases_taps` (:func:`_phase_callees`), called through them (linked in,
    they were 1.5 s of this kernel's 5.4 s compile on a fresh install, Zen 1, and a 3x3
    layer compiled the other sizes' sweep too)."""
    cx, h_, w_, k_, ho_, wo_, r_, s_, sh, sw, pt, pl, dh, m, hq, wq = geo
    # zeroed once per range: the padding positions are the same for every plane, the rest
    # is overwritten; the slack past the end covers the sweep's last, partly used, block
    nbuf = sh * sw * hq * wq + 2 * _LANES
    buf = scratch(nbuf, xf)  # (np.zeros / np.empty: see numbaconv.cpu._jit.scratch)
    zero_run(buf, 0, nbuf)
    op = scratch(hq * wq + _LANES, of)
    filled = -1  # input plane (n * C + c) now in buf
    for q in range(lo, hi):
        n = q // k_
        k = q % k_
        src = n * cx + k // m
        if src != filled:
            call_at(fns, 0, None, (xf, src * h_ * w_, h_, w_, buf, sh, sw, hq, wq, pt, pl))
            filled = src
        if r_ == 3 and s_ == 3:  # (its wide-plane path shares loads between kernel rows)
            call_at(fns, 2, None, (wf, bias, of, q * ho_ * wo_, ho_, wo_, k, sh, dh, wq, offs, buf, op))
        else:
            call_at(fns, 2, None, (wf, bias, of, q * ho_ * wo_, ho_, wo_, k, wq, offs, buf, op))
        if epi is not None:  # (pruned at compile time without an epilogue)
            finish_2d(of, epi, q * ho_ * wo_, 1, 0, ho_ * wo_)


_DW_NCHW_PHASES = Task(_dw_nchw_phases_tasks)


def _phase_callees(xf, wf, bias, of, offs, taps3, unit):
    """:func:`_dw_nchw_phases_tasks`' ``fns`` for these arrays (their Numba types), kernel
    size (``taps3``: 3x3) and stride (``unit``: 1 x 1, whose fill is a padded copy): the
    fill's and the sweep's ``(address, tag)`` pairs; once per combination (``conv2d`` binds
    on every call)."""
    key = (tuple(type_key(a) for a in (xf, wf, bias, of, offs)), taps3, unit)
    fns = _PHASE_CALLEES.get(key)
    if fns is None:
        fns = _PHASE_CALLEES[key] = _build_phase_callees(xf, wf, bias, of, offs, taps3, unit)
    return fns


#: type keys of :func:`_phase_callees`' arrays, its kernel-size and stride flags -> the callee table
_PHASE_CALLEES = {}


def _build_phase_callees(xf, wf, bias, of, offs, taps3, unit):
    i64 = numba.types.int64
    flat = numba.from_dtype(xf.dtype)[::1]  # (the task's own buffers)
    tx, tw, tb, to, tf = (numba.typeof(a) for a in (xf, wf, bias, of, offs))
    fill = callee(_fill_unit if unit else _fill_phases, (tx, i64, i64, i64, flat) + (i64,) * 6)
    if taps3:
        sweep = callee(_plane_phases, (tw, tb, to) + (i64,) * 7 + (tf, flat, flat))
    else:
        sweep = callee(_plane_phases_taps, (tw, tb, to) + (i64,) * 5 + (tf, flat, flat))
    return np.array(fill + sweep, dtype=np.int64)


@jit
def _dw_nchw_blocks_tasks(lo, hi, xf, wf, bias, of, geo, epi):
    """Tasks ``[lo, hi)`` over (image, block of ``cb`` channels) of a 3x3, dilation-1,
    multiplier-1 NCHW depthwise layer with column stride 1 or 2 on small planes: the block's
    planes transposed (8 x 8 in registers) into a zero-padded channels-last copy, the NHWC
    register blocks (:data:`block4_s1` / :data:`block4_s2`, channel vectors) over it into a
    channels-last result, that transposed back into the output planes, and the epilogue
    ``epi`` over them (one contiguous run; None: pruned).  Copy and result stay in L1/L2.
    ``geo``: the integers ``K, H, W, Ho, Wo, sh, sw, pt, pl, Hp, Wp, cb``."""
    k_, h_, w_, ho_, wo_, sh, sw, pt, pl, hp, wp, cb = geo
    nkb = (k_ + cb - 1) // cb
    # zeroed once per range: the padding positions are the same for every block (pixel
    # stride cb whatever the block's channel count), the rest is overwritten
    buf = scratch(hp * wp * cb, xf)  # (np.zeros / np.empty: see numbaconv.cpu._jit.scratch)
    zero_run(buf, 0, hp * wp * cb)
    obuf = scratch(ho_ * wo_ * cb, of)
    xbuf = scratch(h_ * w_ * cb, xf)
    wt = scratch(9 * cb, wf)
    bt = scratch(cb, bias)
    hw = h_ * w_
    howo = ho_ * wo_
    for t in range(lo, hi):
        n = t // nkb
        c0 = (t % nkb) * cb
        nc = min(cb, k_ - c0)
        for k in range(nc):  # the block's weights as 9 rows of nc (the register block's order)
            bt[k] = bias[c0 + k]
            for tap in range(9):
                wt[tap * nc + k] = wf[(c0 + k) * 9 + tap]
        # the planes as one flat transpose (rows of a 7- or 14-pixel plane are too short for
        # the 8 x 8 blocks), then each row into the padded copy
        transpose_block(xf, xbuf, (n * k_ + c0) * hw, hw, 0, cb, nc, hw)
        for h in range(h_):
            move_run(buf, ((h + pt) * wp + pl) * cb, xbuf, h * w_ * cb, w_ * cb)
        for i in range(ho_):
            b0 = i * sh * wp * cb
            j = 0
            while j < wo_:
                if j + 4 > wo_:
                    j = wo_ - 4  # overlap the previous block: same values rewritten
                xb = b0 + j * sw * cb
                if sw == 1:
                    block4_s1(buf, wt, bt, obuf, xb, xb + wp * cb, xb + 2 * wp * cb, (i * wo_ + j) * nc, nc, cb)
                else:
                    block4_s2(buf, wt, bt, obuf, xb, xb + wp * cb, xb + 2 * wp * cb, (i * wo_ + j) * nc, nc, cb)
                j += 4
        dst = (n * k_ + c0) * howo
        transpose_block(obuf, of, 0, nc, dst, howo, howo, nc)
        if epi is not None:  # (pruned at compile time without an epilogue)
            finish_2d(of, epi, dst, 1, 0, nc * howo)


_DW_NCHW_BLOCKS = Task(_dw_nchw_blocks_tasks)

#: planes (zero-padded) up to this many pixels go through channels-last blocks: up to 28x28
#: outputs (Zen 1, MobileNetV2's layers, 2 threads: 960 @ 7x7 184 -> 71 us, 576 @ 14x14
#: 202 -> 129, stride 2 162 -> 72, 192 @ 28x28 169 -> 148); 56x56 planes ran 1.3-1.5x slower
#: (their copies outgrow L1 and the phase planes' row sweeps are long enough)
BLOCKS_MAX_PIXELS = 1024


def _blocks_geometry(p):
    """``geo`` of :func:`_dw_nchw_blocks_tasks` for ``p``, or None where it does not apply."""
    if not (p.k == p.c and p.r == 3 and p.s == 3 and p.dil_h == 1 and p.dil_w == 1 and p.stride_w <= 2
            and p.wo >= 4):
        return None
    cb = block_width(p.dtype)
    hp = max(p.h + p.pad_top, (p.ho - 1) * p.stride_h + 3)
    wp = max(p.w + p.pad_left, (p.wo - 1) * p.stride_w + 3)
    if hp * wp > BLOCKS_MAX_PIXELS:
        return None
    return np.array([p.k, p.h, p.w, p.ho, p.wo, p.stride_h, p.stride_w, p.pad_top, p.pad_left, hp, wp, cb],
                    dtype=np.int64)


@functools.lru_cache(maxsize=256)
def _tap_offsets(r_, s_, sh, sw, dh, dw, hq, wq):
    """Each tap's flat offset from its output pixel in the stride-phase planes (computed once
    per geometry: 36 integer divisions per plane cost as much as a 14x14 plane's arithmetic;
    cached: ``conv2d`` binds on every call)."""
    offs = np.empty(r_ * s_, dtype=np.uintp)
    for r in range(r_):
        for s in range(s_):
            offs[s_ * r + s] = ((((r * dh) % sh) * sw + (s * dw) % sw) * hq + (r * dh) // sh) * wq + (s * dw) // sw
    offs.flags.writeable = False  # (shared between calls)
    return offs


@jit
def _dw_nchw_tasks(lo, hi, x, w_krs, bias, out, sh, sw, pt, pl, dh, dw, m):
    """Planes ``[lo, hi)`` (over ``N * K``) of :func:`_dw_nchw`."""
    k_ = out.shape[1]
    for q in range(lo, hi):
        _plane_nchw(x, w_krs, bias, out, q // k_, q % k_, sh, sw, pt, pl, dh, dw, m)


_DW_NCHW = Task(_dw_nchw_tasks)


def _dw_nchw(x, w_krs, bias, out, sh, sw, pt, pl, dh, dw, m):
    """Any kernel size, plane by plane (:func:`_plane_nchw`), ranges of planes in parallel: its
    own entry point, so the common 3x3 case compiles only :func:`_dw_nchw_phases` (first-call
    latency)."""
    _DW_NCHW(out.shape[0] * out.shape[1], x, w_krs, bias, out, sh, sw, pt, pl, dh, dw, m)


@jit
def _fill_phases(xf, base, h_, w_, buf, sh, sw, hq, wq, pt, pl):
    """``buf[a, b, u, v] = x_pad[u*sh + a, v*sw + b]`` (the ``h_ x w_`` plane at ``xf[base:]``)
    for every position that holds real input (the padding positions keep their zeros): the
    plane split into its stride phases, so every tap of a strided convolution reads one
    unit-stride run."""
    for a in range(sh):
        u_lo, u_hi = valid_range(a - pt, sh, h_, hq)
        if sw == 2:
            # both column phases in one loop over the even-aligned column pairs (2t, 2t+1),
            # deinterleaved with shuffles (one phase at a time compiles to gathers, several
            # times slower; see numbaconv.cpu._vec.strided_runs).  Column c goes to phase
            # (c + pl) % 2 at v = (c + pl) // 2, so a pair's members land at v = t + pl // 2
            # and t + (pl + 1) // 2.
            pe = pl % 2  # the phase of even columns
            ve = pl // 2
            vo = (pl + 1) // 2
            npair = max(0, min(w_ // 2, wq - vo))
            de0 = (2 * a + pe) * hq * wq + ve
            do0 = (2 * a + 1 - pe) * hq * wq + vo
            for u in range(u_lo, u_hi):
                row = base + (u * sh + a - pt) * w_
                _STRIDED(buf, de0 + u * wq, do0 + u * wq, xf, row, 2, npair)
                # columns past the pairs (an odd width's last one; at most a few): each lands
                # in the plane only while its v < wq
                for col in range(2 * npair, w_):
                    v = (col + pl) // 2
                    if v < wq:
                        buf[((2 * a + (col + pl) % 2) * hq + u) * wq + v] = xf[row + col]
            continue
        for b in range(sw):
            v_lo, v_hi = valid_range(b - pl, sw, w_, wq)
            if v_hi <= v_lo:
                continue
            pb = (a * sw + b) * hq * wq + v_lo
            for u in range(u_lo, u_hi):
                src = base + (u * sh + a - pt) * w_ + v_lo * sw + b - pl
                if sw == 1:  # (a memmove: no loop to vectorise and compile)
                    move_run(buf, pb + u * wq, xf, src, v_hi - v_lo)
                else:
                    _STRIDED(buf, pb + u * wq, 0, xf, src, sw, v_hi - v_lo)


@jit
def _fill_unit(xf, base, h_, w_, buf, sh, sw, hq, wq, pt, pl):
    """:func:`_fill_phases` for stride 1 (one phase: the zero-padded plane), a memmove per
    row: a stride-1 layer compiles this instead of the strided copies (0.5 s on a fresh
    install)."""
    u_lo, u_hi = valid_range(-pt, 1, h_, hq)
    v_lo, v_hi = valid_range(-pl, 1, w_, wq)
    for u in range(u_lo, u_hi):
        move_run(buf, u * wq + v_lo, xf, base + (u - pt) * w_ + v_lo - pl, v_hi - v_lo)


@jit
def _copy_out(op, of, base, ho_, wo_, wq):
    """The ``Wo`` real columns of each of the ``Ho`` rows of ``op`` (laid out at the phase
    width ``wq``) into the output plane ``of[base:base + Ho*Wo]`` (a memmove per row: no loop
    to vectorise and compile)."""
    for i in range(ho_):
        move_run(of, base + i * wo_, op, i * wq, wo_)


#: the 3x3 phase sweeps (:func:`numbaconv.cpu._vec.tap_sweep`): one output row; two rows of
#: row stride 1 (row i + 1's kernel rows 0-1 are row i's 1-2: 12 loads for 18 FMAs); two rows
#: of row stride 2 (row i + 1's kernel row 0 is row i's 2: 15 loads), ``extra`` = the phase width
_TAPS9 = tuple((t, 0) for t in range(9))
_STRIDED = strided_runs(target_vector_bytes())  # (_fill_phases' copies)
#: the NHWC pixel and run loops of _dw_nhwc_tasks: all 9 taps, one tap, the bias alone
_CH_TAPS9, _CH_TAPS5, _CH_TAPS1, _CH_TAPS0 = (channel_taps(t, target_vector_bytes()) for t in (9, 5, 1, 0))
_SWEEP_ROW = tap_sweep(_TAPS9, (tuple(range(9)),), target_vector_bytes())
_SWEEP_PAIR_S1 = tap_sweep(_TAPS9 + ((6, 1), (7, 1), (8, 1)), (tuple(range(9)), tuple(range(3, 12))),
                           target_vector_bytes())
_SWEEP_PAIR_S2 = tap_sweep(_TAPS9 + ((3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1)),
                           (tuple(range(9)), tuple(range(6, 15))), target_vector_bytes())


@jit
def _plane_phases(wf, bias, of, base, ho_, wo_, k, sh, dh, wq, offs, buf, op):
    """3x3 output plane ``of[base:base + Ho*Wo]`` (channel ``k``) from the phase planes in
    ``buf`` (:func:`_fill_phases`).

    With the output laid out at the phase width ``wq``, tap ``(r, s)`` reads ``buf`` at a
    fixed flat shift from the output pixel, whatever the stride or dilation: one flat 9-tap
    sweep, no border cases, then the ``Wo`` real columns of each row are copied out (the
    ``wq - Wo`` extra ones read wrapped data and are dropped).  On small or strided planes
    the scalar border loops and stride-2 loads of :func:`_plane3x3` cost more than the sweep.
    """
    kk = 9 * k
    b = bias[k]
    if sh <= 2 and dh == 1 and wo_ >= _ROW_PAIRS_MIN_W:
        # wide planes, row stride 1 or 2: two output rows per sweep, straight into ``out``
        # (the pair's shared input rows loaded once), and no copy-out pass
        for i in range(0, ho_, 2):
            dst = base + i * wo_
            if i + 1 == ho_:  # odd last row
                _SWEEP_ROW(buf, offs, 0, wf, kk, b, of, dst, 0, i * wq, wo_)
            elif sh == 1:
                _SWEEP_PAIR_S1(buf, offs, wq, wf, kk, b, of, dst, wo_, i * wq, wo_)
            else:
                _SWEEP_PAIR_S2(buf, offs, wq, wf, kk, b, of, dst, wo_, i * wq, wo_)
        return
    # Narrow planes: one flat sweep over the rows at the phase width in whole blocks of
    # _LANES (the buffers' slack covers the last), then the Wo real columns of each row
    # are copied out.
    _SWEEP_ROW(buf, offs, 0, wf, kk, b, op, 0, 0, 0, ((ho_ - 1) * wq + wo_ + _LANES - 1) // _LANES * _LANES)
    _copy_out(op, of, base, ho_, wo_, wq)


@jit
def _plane_phases_taps(wf, bias, of, base, ho_, wo_, k, wq, offs, buf, op):
    """:func:`_plane_phases`' flat sweep for any kernel size (EfficientNet's 5x5): the plane
    at the phase width accumulates one tap at a time (a unit-stride vector loop each), then
    the ``Wo`` real columns of each row are copied out."""
    taps = offs.size
    nq = np.uintp((ho_ - 1) * wq + wo_)
    b = bias[k]
    for q in range(nq):
        op[q] = b
    for t in range(taps):
        wt = wf[taps * k + t]
        src = buf[offs[t]:]
        for q in range(nq):
            op[q] += wt * src[q]
    _copy_out(op, of, base, ho_, wo_, wq)


# --- NHWC depthwise ----------------------------------------------------------------------------
@jit(inline="always")  # (into its callers: one function less to compile)
def _grid3(base, ds, dr):
    """The 9 offsets of a 3x3 grid from ``base``, taps ``ds`` apart in a row and rows ``dr``
    apart, row by row: the tap order of the 9-tap channel loops' inputs and weights."""
    r1 = base + dr
    r2 = r1 + dr
    return (base, base + ds, base + ds + ds, r1, r1 + ds, r1 + ds + ds, r2, r2 + ds, r2 + ds + ds)


@jit(inline="always")  # (into its callers: one function less to compile)
def _row5(base, ds):
    """The 5 offsets of a kernel row of 5 taps ``ds`` apart from ``base``."""
    return (base, base + ds, base + ds + ds, base + 3 * ds, base + 4 * ds)


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
            # of[ob + k] = bias[k] + sum over t of xf[x_t + k] * wf[t uk + k], k < uk
            _CH_TAPS9(of, ob, xf, _grid3(xb, np.uintp(dw * c_), np.uintp(dh * w_ * c_)),
                      wf, _grid3(np.uintp(0), uk, uk + uk + uk), bias, 0, True, uk)
            continue
        if m == 1 and s_ == 5 and w0 >= 0 and w0 + 4 * dw < w_:
            # a 5-wide kernel at an interior column: each kernel row's 5 taps in one pass over the
            # channels, one store of the output pixel per row, not per tap (EfficientNet's 5x5
            # depthwise layers)
            init = np.bool_(True)
            for r in range(r_):
                hi = h0 + r * dh
                if hi < 0 or hi >= h_:
                    continue
                xb = np.uintp(((n * h_ + hi) * w_ + w0) * c_)
                _CH_TAPS5(of, ob, xf, _row5(xb, np.uintp(dw * c_)), wf, _row5(np.uintp(r * s_ * k_), uk), bias, 0,
                          init, uk)
                init = False
            if init:  # (every kernel row in the padding)
                _CH_TAPS0(of, ob, xf, (), wf, (), bias, 0, True, uk)
            continue
        _CH_TAPS0(of, ob, xf, (), wf, (), bias, 0, True, uk)  # of[ob + k] = bias[k]
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
                if m == 1:  # of[ob + k] += xf[xb + k] * wf[wb + k]
                    _CH_TAPS1(of, ob, xf, (xb,), wf, (wb,), bias, 0, False, uk)
                else:
                    for c in range(c_):
                        xc = xf[xb + np.uintp(c)]
                        for q in range(m):
                            kk = np.uintp(c * m + q)
                            of[ob + kk] += xc * wf[wb + kk]


@jit
def _window(xf, buf, n, top, c0, ncol, h_, w_, k_):
    """``buf[(r * ncol + c) * K + k] = x[n, top + r, c0 + c, k]`` for ``r < 3``, ``c < ncol``;
    0 outside the image (its zero padding)."""
    for r in range(3):
        hi = top + r
        for c in range(ncol):
            wi = c0 + c
            d = (r * ncol + c) * k_
            if 0 <= hi < h_ and 0 <= wi < w_:  # (a memmove, a memset: no loops to vectorise and compile)
                move_run(buf, d, xf, ((n * h_ + hi) * w_ + wi) * k_, k_)
            else:
                zero_run(buf, d, k_)


@jit
def _dw_nhwc_ring_rows(t0, t1, x, w_rsk, bias, out, sh, sw, pt, pl, epi, s1, s2):
    """Output rows ``t in [t0, t1)`` (over ``n * Ho``) of a 3x3, dilation-1, multiplier-1 NHWC
    depthwise problem with column stride ``sw`` of 1 or 2 (any row stride), in 4-pixel
    register blocks (:data:`block4_s1` / :data:`block4_s2`; the last block of a row overlaps
    the previous one).  A block whose 3 x ``3 sw + 3`` input window lies inside the image
    reads the input in place; one that meets the zero padding reads a copy of its window
    with the padding filled in (a few blocks per row: no copy of whole rows).  Each finished
    row then goes through the epilogue ``epi`` (None: pruned; see ``epilogue.finish_2d``).
    ``s1, s2``: the column stride, ``(True, None)`` or ``(None, True)``: Numba prunes the other
    stride's block from the argument's type (a layer compiles one block)."""
    n_, ho_, wo_, k_ = out.shape
    h_, w_ = x.shape[1], x.shape[2]
    ncol = 3 * sw + 3
    xf = x.ravel()
    buf = scratch(3 * ncol * k_, xf)  # (np.empty: see numbaconv.cpu._jit.scratch)
    wf = w_rsk.ravel()
    of = out.ravel()
    uk = np.uintp(k_)
    ucs = np.uintp(k_)
    urow = np.uintp(ncol * k_)
    for t in range(t0, t1):
        n = t // ho_
        i = t % ho_
        top = i * sh - pt
        inside = top >= 0 and top + 3 <= h_
        row0 = np.uintp(((n * h_ + max(top, 0)) * w_) * k_)
        urw = np.uintp(w_ * k_)
        orow = (n * ho_ + i) * wo_
        j = 0
        while j < wo_:
            if j + 4 > wo_:
                j = wo_ - 4  # overlap the previous block: same values rewritten
            c0 = j * sw - pl
            ob = np.uintp((orow + j) * k_)
            if inside and c0 >= 0 and c0 + ncol <= w_:
                b0 = row0 + np.uintp(c0 * k_)
                src, b1, b2 = xf, b0 + urw, b0 + urw + urw
            else:
                _window(xf, buf, n, top, c0, ncol, h_, w_, k_)
                src, b0, b1, b2 = buf, np.uintp(0), urow, urow + urow
            if s1 is not None:
                block4_s1(src, wf, bias, of, b0, b1, b2, ob, uk, ucs)
            if s2 is not None:
                block4_s2(src, wf, bias, of, b0, b1, b2, ob, uk, ucs)
            j += 4
        if epi is not None:  # (pruned at compile time without an epilogue)
            finish_2d(of, epi, orow * k_, 1, 0, wo_ * k_)


_DW_NHWC_RING = Task(_dw_nhwc_ring_rows)


def _dw_nhwc_ring(x, w_rsk, bias, out, sh, sw, pt, pl, epi):
    """:func:`_dw_nhwc_ring_rows` over ranges of the ``N * Ho`` output rows, in parallel."""
    # (weights, bias and geometry keep their types for the layer: only these vary)
    stride = (True, None) if sw == 1 else (None, True)
    _DW_NHWC_RING.run((type_key(x), type_key(out), arg_key(epi), sw), out.shape[0] * out.shape[1], x, w_rsk, bias,
                      out, sh, sw, pt, pl, epi, *stride)


@jit
def _dw_nhwc_tasks(lo, hi, x, w_rsk, bias, out, sh, sw, pt, pl, dh, dw, m, wt, pix):
    """Output rows ``[lo, hi)`` (over ``N * Ho``) of :func:`_dw_nhwc`, each vectorised across
    channels (the cases the ring of :func:`_dw_nhwc_ring_rows` does not take: strided,
    dilated, few channels, m > 1).  (The row's body is written out in the loop: a function
    level less to compile, link and emit.)

    Multiplier 1, 3x3, stride 1: runs of ``pix`` pixels as one contiguous loop.  Multiplier
    1, 3x3, interior pixel: one loop over the channels with all 9 taps (18 loads, 9 FMAs, 1
    store per vector).  Other pixels (borders, other kernels, m > 1): tap by tap into the
    output pixel, which stays in L1.  The loops over channels are explicit vectors
    (:func:`numbaconv.cpu._vec.channel_taps`).
    """
    h_, w_ = x.shape[1], x.shape[2]
    r_, s_, k_ = w_rsk.shape
    wo_ = out.shape[2]
    c_ = k_ // m
    xf = x.ravel()
    of = out.ravel()
    ho_ = out.shape[1]
    for t in range(lo, hi):
        n = t // ho_
        i = t % ho_
        rows_ok = np.bool_(True)  # (typed, not literal: one compile of _row_nhwc_pixels)
        for r in range(r_):
            hr = i * sh + r * dh - pt
            if hr < 0 or hr >= h_:
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
            wtaps = _grid3(np.uintp(0), run, run + run + run)
            while j + pix <= wo_ and j + pix - 1 - pl + 2 * dw < w_:
                ob = np.uintp(((n * out.shape[1] + i) * wo_ + j) * k_)
                xb = np.uintp(((n * h_ + h0) * w_ + j - pl) * c_)
                # of[ob + q] = wt[9 run + q] + sum over t of xf[x_t + q] * wt[t run + q], q < run
                _CH_TAPS9(of, ob, xf, _grid3(xb, ds, dr), wt, wtaps, wt, 9 * run, True, run)
                j += pix
            # pixels [0, max(0, pl)) and the tail go pixel by pixel below
            _row_nhwc_pixels(x, w_rsk, bias, out, n, i, sh, sw, pt, pl, dh, dw, m, np.int64(0), max(0, pl), rows_ok)
        _row_nhwc_pixels(x, w_rsk, bias, out, n, i, sh, sw, pt, pl, dh, dw, m, j, wo_, rows_ok)


_DW_NHWC = Task(_dw_nhwc_tasks)


def _dw_nhwc(x, w_rsk, bias, out, sh, sw, pt, pl, dh, dw, m, wt, pix):
    """:func:`_dw_nhwc_tasks` over ranges of the ``N * Ho`` output rows, in parallel."""
    _DW_NHWC(out.shape[0] * out.shape[1], x, w_rsk, bias, out, sh, sw, pt, pl, dh, dw, m, wt, pix)


#: 3x3 NCHW planes up to this output width go through zero-padded stride-phase copies
#: (:func:`_plane_phases`); wider ones through :func:`_plane3x3` (flat sweep + scalar borders)
_PHASES_MAX_W = 256
#: ... and from this width on, stride-1 rows are swept in pairs straight into the output
_ROW_PAIRS_MIN_W = 32
#: the narrow planes' block of output columns (16 float32 = one zmm, two ymm)
_LANES = 16

_ZERO_BIAS = {}


def _bias(p, bias):
    """``bias`` or a cached read-only zero vector (no allocation per call)."""
    if bias is not None:
        return bias
    key = (p.k, p.dtype)
    b = _ZERO_BIAS.get(key)
    if b is None:
        b = np.zeros(p.k, dtype=p.dtype)
        _ZERO_BIAS[key] = b
    return b


def run(p, x, w, bias, out, wlayout="OIHW", epi=NONE):
    """Depthwise ``p`` (``p.groups == p.c``): same contract as every algorithm's ``run``;
    ``w`` in ``wlayout``, "OIHW" ``(K, 1, R, S)`` or "HWIO" ``(R, S, 1, K)``.  The kernels take
    ``(R, S, K)`` (NHWC) or ``(K, R, S)`` (NCHW): a view of HWIO or OIHW weights respectively;
    the other way round costs a transposing copy (~10 us for 512 channels, a sixth of a
    14x14 layer).  ``epi``: the epilogue, fused into the 3x3 kernels (a pass after the others).
    """
    bind(p, w, bias, wlayout)(x, out, epi)


def bind(p, w, bias, wlayout="OIHW"):
    """:func:`run`'s choices and weight views for ``p``, as a function of ``(x, out, epi)``."""
    m = p.k // p.c
    b = _bias(p, bias)
    geometry = (p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w, m)
    w = np.ascontiguousarray(w)
    if p.layout == "NHWC":
        w_rsk = w.reshape(p.r, p.s, p.k) if wlayout == "HWIO" else np.ascontiguousarray(w[:, 0].transpose(1, 2, 0))
        if (m == 1 and p.r == 3 and p.s == 3 and p.stride_w <= 2 and p.dil_h == 1
                and p.dil_w == 1 and p.k >= 8 and p.wo >= 4):
            ring = (p.stride_h, p.stride_w, p.pad_top, p.pad_left)
            return lambda x, out, epi: _dw_nhwc_ring(x, w_rsk, b, out, *ring, epi.kernel_arg(out.reshape(-1)))
        # pixels per contiguous run of the stride-1 path: ~256 values per vector loop
        pix = 1
        if m == 1 and p.stride_w == 1 and p.r == 3 and p.s == 3:
            pix = max(1, min(p.wo, 256 // p.k))
        if pix > 1:
            wt = np.empty((10, pix, p.k), dtype=p.dtype)
            wt[:9] = w_rsk.reshape(9, 1, p.k)
            wt[9] = b
            wt = wt.ravel()
        else:
            wt = np.zeros(1, dtype=p.dtype)
        return after(lambda x, out: _dw_nhwc(x, w_rsk, b, out, *geometry, wt, pix))
    w_krs = w.reshape(p.k, p.r, p.s) if wlayout == "OIHW" else np.ascontiguousarray(w[:, :, 0].transpose(2, 0, 1))
    geo = _blocks_geometry(p)
    if geo is not None:
        # small planes: blocks of channels through channels-last copies and the NHWC register
        # blocks (a 7x7 or 14x14 plane's rows are too short for vectors along them; see
        # BLOCKS_MAX_PIXELS)
        wf = w_krs.reshape(-1)
        jobs = p.n * -(-p.k // int(geo[-1]))

        def blocks(x, out, epi):
            xf, of = x.reshape(-1), out.reshape(-1)
            ea = epi.kernel_arg(of)
            _DW_NCHW_BLOCKS.run((type_key(xf), type_key(of), arg_key(ea)), jobs, xf, wf, b, of, geo, ea)
        return blocks
    if p.wo <= _PHASES_MAX_W:
        # phase planes reach every tap of every output pixel (see _plane_phases)
        hq = p.ho + (p.r - 1) * p.dil_h // p.stride_h
        wq = p.wo + (p.s - 1) * p.dil_w // p.stride_w
        # planes through (L1/L2-resident) zero-padded stride-phase copies of ``sh*sw`` planes
        # of ``hq x wq``, allocated once per range of planes (3x3: _plane_phases, other sizes:
        # _plane_phases_taps), each then through the epilogue; ranges of planes in parallel.
        # Flat views here, once: ``ravel`` per plane cost a quarter of a 14x14 plane.
        offs = _tap_offsets(p.r, p.s, p.stride_h, p.stride_w, p.dil_h, p.dil_w, hq, wq)
        wf = w_krs.reshape(-1)
        geo = np.array([p.c, p.h, p.w, p.k, p.ho, p.wo, p.r, p.s, p.stride_h, p.stride_w, p.pad_top, p.pad_left,
                        p.dil_h, m, hq, wq], dtype=np.int64)

        jobs = p.n * p.k

        def phases(x, out, epi):
            xf, of = x.reshape(-1), out.reshape(-1)
            ea = epi.kernel_arg(of)
            # (weights, bias and geometry keep their types for the layer: only these vary)
            key = (type_key(xf), type_key(of))
            f = _phase_callees(xf, wf, b, of, offs, p.r == 3 and p.s == 3, p.stride_h == p.stride_w == 1)
            _DW_NCHW_PHASES.run(key + (arg_key(ea),), jobs, xf, wf, b, of, offs, geo, ea, f)
        return phases
    return after(lambda x, out: _dw_nchw(x, w_krs, b, out, *geometry))


# --- streaming kernel for few-channel dense problems ------------------------------------------
@jit
def _pass3_k3(o0, o1, o2, x0, x1, x2, w, cc, first, bias, w_, pl):
    """Three output rows (``K = 3``, one group) += one input channel's three rows through
    a 3x3 kernel, stride 1, dilation 1: every input vector loaded once for the three
    outputs (27 weights as broadcasts) -- half the loads of three :func:`_pass3`."""
    cg = w.shape[1]
    wf = w.ravel()
    wo_ = o0.shape[0]
    lo, hi = valid_range(-pl, 1, w_, wo_)
    lo2, hi2 = valid_range(2 - pl, 1, w_, wo_)
    lo, hi = _border_range(max(lo, lo2), min(hi, hi2), wo_)
    s3, one, acc = np.int64(3), np.int64(1), np.bool_(False)  # (as in _pass3: one _border)
    for k in range(3):
        o = o0 if k == 0 else (o1 if k == 1 else o2)
        wb = (k * cg + cc) * 9
        b = bias[k]
        for t in range(2):
            j0, j1 = (0, lo) if t == 0 else (hi, wo_)
            _border(o, x0, wf, wb, s3, one, one, -pl, w_, first, b, j0, j1)
            _border(o, x1, wf, wb + 3, s3, one, one, -pl, w_, acc, b, j0, j1)
            _border(o, x2, wf, wb + 6, s3, one, one, -pl, w_, acc, b, j0, j1)
    if hi <= lo:
        return
    n = np.uintp(hi - lo)
    q0 = lo - pl
    a = x0[q0:]
    c = x1[q0:]
    e = x2[q0:]
    p0 = o0[lo:hi]
    p1 = o1[lo:hi]
    p2 = o2[lo:hi]
    u1 = np.uintp(1)
    u2 = np.uintp(2)
    k0 = cc * 9
    k1 = (cg + cc) * 9
    k2 = (2 * cg + cc) * 9
    v0, v1, v2, v3, v4, v5, v6, v7, v8 = (wf[k0], wf[k0 + 1], wf[k0 + 2], wf[k0 + 3], wf[k0 + 4], wf[k0 + 5],
                                          wf[k0 + 6], wf[k0 + 7], wf[k0 + 8])
    y0, y1, y2, y3, y4, y5, y6, y7, y8 = (wf[k1], wf[k1 + 1], wf[k1 + 2], wf[k1 + 3], wf[k1 + 4], wf[k1 + 5],
                                          wf[k1 + 6], wf[k1 + 7], wf[k1 + 8])
    z0, z1, z2, z3, z4, z5, z6, z7, z8 = (wf[k2], wf[k2 + 1], wf[k2 + 2], wf[k2 + 3], wf[k2 + 4], wf[k2 + 5],
                                          wf[k2 + 6], wf[k2 + 7], wf[k2 + 8])
    if first:
        b0, b1, b2 = bias[0], bias[1], bias[2]
        for j in range(n):
            a0, a1, a2 = a[j], a[j + u1], a[j + u2]
            c0, c1, c2 = c[j], c[j + u1], c[j + u2]
            e0, e1, e2 = e[j], e[j + u1], e[j + u2]
            p0[j] = b0 + v0 * a0 + v1 * a1 + v2 * a2 + v3 * c0 + v4 * c1 + v5 * c2 + v6 * e0 + v7 * e1 + v8 * e2
            p1[j] = b1 + y0 * a0 + y1 * a1 + y2 * a2 + y3 * c0 + y4 * c1 + y5 * c2 + y6 * e0 + y7 * e1 + y8 * e2
            p2[j] = b2 + z0 * a0 + z1 * a1 + z2 * a2 + z3 * c0 + z4 * c1 + z5 * c2 + z6 * e0 + z7 * e1 + z8 * e2
    else:
        for j in range(n):
            a0, a1, a2 = a[j], a[j + u1], a[j + u2]
            c0, c1, c2 = c[j], c[j + u1], c[j + u2]
            e0, e1, e2 = e[j], e[j + u1], e[j + u2]
            p0[j] += v0 * a0 + v1 * a1 + v2 * a2 + v3 * c0 + v4 * c1 + v5 * c2 + v6 * e0 + v7 * e1 + v8 * e2
            p1[j] += y0 * a0 + y1 * a1 + y2 * a2 + y3 * c0 + y4 * c1 + y5 * c2 + y6 * e0 + y7 * e1 + y8 * e2
            p2[j] += z0 * a0 + z1 * a1 + z2 * a2 + z3 * c0 + z4 * c1 + z5 * c2 + z6 * e0 + z7 * e1 + z8 * e2


#: the plane sweep's register blocks (roles swapped as in numbaconv.cpu.pointwise: the
#: weights broadcast, the input row loaded as vectors): 8 and 1 vectors of output pixels (8
#: independent FMA chains: with 4, a 5x5 plane was bound by their latency)
_PLANE8 = conv_block(1, 8, None, vector_bytes=target_vector_bytes(), row_bias=True, prefetch=False)
_PLANE1 = conv_block(1, 1, None, vector_bytes=target_vector_bytes(), row_bias=True, prefetch=False)
#: the lanes of their vectors, as the blocks choose them (numbaconv.cpu._vec.lanes: at least 4)
_PLANE_LANES32, _PLANE_LANES64 = (lanes(target_vector_bytes(), item) for item in (4, 8))


@jit
def _plane_row(x, w, bias, out, n, i, h0, pl, dh, dw, groups):
    """Output row ``i`` of image ``n``, every channel, of a layer with unit column stride and
    one input channel per group whose kernel rows (from input row ``h0``) all lie inside the
    input: each output vector is one register chain over all ``R x S`` taps
    (:data:`_PLANE8`, :data:`_PLANE1`), stored once with its bias; the columns whose taps
    reach into the zero padding, and a last part narrower than a vector, tap by tap.  (The
    row sweeps of :func:`_pass` read and write each output row once per 5 taps: a 5x5
    single-channel 2048^2 image took 5.9 ms on one Intel Xeon core, ~3.7 cycles per output.)"""
    k_, ho_, wo_ = out.shape[1], out.shape[2], out.shape[3]
    c_, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
    r_, s_ = w.shape[2], w.shape[3]
    kg = k_ // groups
    xf = x.reshape(-1)
    wf = w.reshape(-1)
    of = out.reshape(-1)
    lo, hi = valid_range(-pl, 1, w_, wo_)
    lo2, hi2 = valid_range(-pl + (s_ - 1) * dw, 1, w_, wo_)
    lo, hi = _border_range(max(lo, lo2), min(hi, hi2), wo_)
    tmp = scratch(1, xf)
    nl = _PLANE_LANES32 if x.itemsize == 4 else _PLANE_LANES64
    for k in range(k_):
        g = k // kg
        xb = ((n * c_ + g) * h_ + h0) * w_ - pl  # (input column of output column 0, tap 0)
        ob = ((n * k_ + k) * ho_ + i) * wo_
        wb = k * r_ * s_
        j = lo
        while j + 8 * nl <= hi:
            _PLANE8(wf, xf, tmp, wb, xb + j, r_, 1, s_, 0, 0, dw, dh * w_, s_, of, ob + j, 0, bias, k, 1)
            j += 8 * nl
        while j + nl <= hi:
            _PLANE1(wf, xf, tmp, wb, xb + j, r_, 1, s_, 0, 0, dw, dh * w_, s_, of, ob + j, 0, bias, k, 1)
            j += nl
        o = out[n, k, i]
        for r in range(r_):
            xr = x[n, g, h0 + r * dh]
            _border(o, xr, wf, (k * r_ + r) * s_, s_, 1, dw, -pl, w_, r == 0, bias[k], np.int64(0), lo)
            _border(o, xr, wf, (k * r_ + r) * s_, s_, 1, dw, -pl, w_, r == 0, bias[k], j, wo_)


@jit
def _stream_nchw_tasks(lo, hi, x, w, bias, out, sh, sw, pt, pl, dh, dw, groups):
    """Output rows ``[lo, hi)`` (over ``N * Ho``) of :func:`_stream_nchw`, all channels."""
    k_, ho_ = out.shape[1], out.shape[2]
    cg, r_, s_ = w.shape[1], w.shape[2], w.shape[3]
    h_, w_ = x.shape[2], x.shape[3]
    kg = k_ // groups
    k3 = k_ == 3 and groups == 1 and r_ == 3 and s_ == 3 and sw == 1 and dw == 1
    for t in range(lo, hi):
        n = t // ho_
        i = t % ho_
        h0 = i * sh - pt
        if k3 and h0 >= 0 and h0 + 2 * dh < h_:
            for cc in range(cg):
                xc = x[n, cc]
                _pass3_k3(out[n, 0, i], out[n, 1, i], out[n, 2, i], xc[h0], xc[h0 + dh], xc[h0 + 2 * dh], w, cc,
                          cc == 0, bias, w_, pl)
            continue
        for k in range(k_):
            g = k // kg
            o = out[n, k, i]
            wk = w[k].ravel()
            b = bias[k]
            first = np.bool_(True)  # (not a literal: one compile of _pass and _pass3)
            for cc in range(cg):
                xc = x[n, g * cg + cc]
                if r_ == 3 and s_ == 3 and h0 >= 0 and h0 + 2 * dh < h_:
                    _pass3(o, xc[h0], xc[h0 + dh], xc[h0 + 2 * dh], wk, cc * 9, sw, dw, -pl, w_, b, first)
                    first = False
                    continue
                for r in range(r_):
                    hi_ = h0 + r * dh
                    if hi_ < 0 or hi_ >= h_:
                        continue
                    _pass(o, xc[hi_], wk, (cc * r_ + r) * s_, s_, sw, dw, -pl, w_, first, b)
                    first = False
            if first:  # (a loop: no slice assignment in a serial function)
                for j in range(o.shape[0]):
                    o[j] = b


_STREAM_NCHW = Task(_stream_nchw_tasks)


@jit
def _stream_plane_tasks(lo, hi, x, w, bias, out, sh, sw, pt, pl, dh, dw, groups, fns):
    """:func:`_stream_nchw_tasks` for one input channel per group at unit column stride: rows
    whose kernel rows all lie inside the input by :func:`_plane_row`, the others by
    :func:`_stream_nchw_tasks` through its address ``fns`` (:func:`_plane_callees`).  Its own
    task, so that only such layers compile the plane blocks (~1 s more for the first
    few-channel layer of a fresh install when they sat in the common task), and it links
    none of the common task's code."""
    ho_ = out.shape[2]
    h_ = x.shape[2]
    r_ = w.shape[2]
    for t in range(lo, hi):
        h0 = (t % ho_) * sh - pt
        if h0 >= 0 and h0 + (r_ - 1) * dh < h_:
            _plane_row(x, w, bias, out, t // ho_, t % ho_, h0, pl, dh, dw, groups)
        else:
            call_at(fns, 0, None, (t, t + 1, x, w, bias, out, sh, sw, pt, pl, dh, dw, groups))


_STREAM_PLANE = Task(_stream_plane_tasks)

#: type keys of the streaming kernel's arrays -> :func:`_plane_callees`' table
_PLANE_CALLEES = {}


def _plane_callees(x, w, bias, out):
    """:func:`_stream_plane_tasks`' ``fns``: the address of :func:`_stream_nchw_tasks` for these
    arrays' types (once per combination)."""
    key = tuple(type_key(a) for a in (x, w, bias, out))
    fns = _PLANE_CALLEES.get(key)
    if fns is None:
        i64 = numba.types.int64
        fns = _PLANE_CALLEES[key] = np.array(
            callee(_stream_nchw_tasks, (i64, i64) + tuple(numba.typeof(a) for a in (x, w, bias, out)) + (i64,) * 7),
            dtype=np.int64)
    return fns


def _stream_nchw(x, w, bias, out, sh, sw, pt, pl, dh, dw, groups):
    """:func:`_stream_nchw_tasks` over ranges of the ``N * Ho`` output rows, in parallel (one
    input channel per group at unit column stride, beyond 3 x 3 taps: :func:`_stream_plane_tasks`)."""
    if w.shape[1] == 1 and sw == 1 and w.shape[2] * w.shape[3] > 9:
        _STREAM_PLANE(out.shape[0] * out.shape[2], x, w, bias, out, sh, sw, pt, pl, dh, dw, groups,
                      _plane_callees(x, w, bias, out))
    else:
        _STREAM_NCHW(out.shape[0] * out.shape[2], x, w, bias, out, sh, sw, pt, pl, dh, dw, groups)


@jit
def _to_planar(src, s0, n, c_, dst, d0, pitch):
    """dst[d0 + c*pitch + j] = src[s0 + j*c_ + c] for j < n (an NHWC row to planar rows);
    3 channels unrolled.  The streaming kernels' row transposition, forward and backward."""
    if c_ == 3:
        a = dst[d0:]
        b = dst[d0 + pitch:]
        e = dst[d0 + 2 * pitch:]
        s = src[s0:]
        u1 = np.uintp(1)
        u2 = np.uintp(2)
        u3 = np.uintp(3)
        for j in range(np.uintp(n)):
            q = j * u3
            a[j] = s[q]
            b[j] = s[q + u1]
            e[j] = s[q + u2]
    else:
        uc = np.uintp(c_)
        for c in range(c_):
            dc = dst[d0 + c * pitch:]
            sc = src[s0 + c:]
            for j in range(np.uintp(n)):
                dc[j] = sc[j * uc]


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
def _stream_nhwc_rows(i0, i1, x, w, bias, out, sh, sw, pt, pl, dh, dw, groups):
    """Output rows ``t in [i0, i1)`` (over ``n * Ho``) of an NHWC problem: each input row is
    transposed once into a ring of planar rows, computed planar, written back interleaved."""
    n_, ho_, wo_, k_ = out.shape
    cg, r_, s_ = w.shape[1], w.shape[2], w.shape[3]
    h_, w_, c_ = x.shape[1], x.shape[2], x.shape[3]
    kg = k_ // groups
    k3 = k_ == 3 and groups == 1 and r_ == 3 and s_ == 3 and sw == 1 and dw == 1
    rb = (r_ - 1) * dh + 1
    ring = np.empty((c_, rb, w_), dtype=x.dtype)
    ringf = ring.ravel()
    xf = x.ravel()
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
            _to_planar(xf, (n * h_ + hi) * w_ * c_, w_, c_, ringf, (hi % rb) * w_, rb * w_)
        loaded_to = max(loaded_to, top + rb)
        if k3 and top >= 0 and top + 2 * dh < h_:
            for cc in range(cg):
                _pass3_k3(acc[0], acc[1], acc[2], ring[cc, top % rb], ring[cc, (top + dh) % rb],
                          ring[cc, (top + 2 * dh) % rb], w, cc, cc == 0, bias, w_, pl)
            _store_row_interleaved(acc, out[n, i].ravel())
            continue
        for k in range(k_):
            g = k // kg
            o = acc[k]
            wk = w[k].ravel()
            b = bias[k]
            first = np.bool_(True)  # (not a literal: one compile of _pass and _pass3)
            for cc in range(cg):
                c = g * cg + cc
                if r_ == 3 and s_ == 3 and top >= 0 and top + 2 * dh < h_:
                    _pass3(o, ring[c, top % rb], ring[c, (top + dh) % rb], ring[c, (top + 2 * dh) % rb], wk,
                           cc * 9, sw, dw, -pl, w_, b, first)
                    first = False
                    continue
                for r in range(r_):
                    hi = top + r * dh
                    if hi < 0 or hi >= h_:
                        continue
                    _pass(o, ring[c, hi % rb], wk, (cc * r_ + r) * s_, s_, sw, dw, -pl, w_, first, b)
                    first = False
            if first:
                for j in range(o.shape[0]):
                    o[j] = b
        _store_row_interleaved(acc, out[n, i].ravel())


_STREAM_NHWC = Task(_stream_nhwc_rows)


def _stream_nhwc(x, w, bias, out, sh, sw, pt, pl, dh, dw, groups):
    """:func:`_stream_nhwc_rows` over ranges of the ``N * Ho`` output rows, in parallel (one
    ring of rows per range)."""
    _STREAM_NHWC(out.shape[0] * out.shape[1], x, w, bias, out, sh, sw, pt, pl, dh, dw, groups)


def run_streaming(p, x, w_oihw, bias, out):
    """Few-channel dense (or grouped) ``p``: same contract as every algorithm's ``run``."""
    b = _bias(p, bias)
    w = np.ascontiguousarray(w_oihw)
    nchw = p.layout == "NCHW"
    if not nchw and p.c == p.k == 1 and x.flags.c_contiguous and out.flags.c_contiguous:
        # one channel in and out: the NHWC arrays are the NCHW ones (views), and the NCHW
        # plane blocks run it (a 2048^2 5x5 filter on one Intel Xeon core 8.7 -> 3.6 ms)
        x, out, nchw = x.reshape(p.n, 1, p.h, p.w), out.reshape(p.n, 1, p.ho, p.wo), True
    if nchw:
        _stream_nchw(x, w, b, out, p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w,
                     p.groups)
    else:
        _stream_nhwc(x, w, b, out, p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w,
                     p.groups)


# --- NHWC register blocks ---------------------------------------------------------------------
#: the NHWC stride-1 register block: 4 output pixels x all channels, in vectors of the
#: target's width (explicit LLVM vectors: 16 zmm lanes on AVX-512, 8 ymm on AVX2)
block4_s1 = dw3x3_block(4, 1, target_vector_bytes())
block4_s2 = dw3x3_block(4, 2, target_vector_bytes())  # column stride 2 (MobileNet's downsampling)


def microkernel_asm(dtype=np.float32):
    """Machine code of :data:`block4_s1` for ``dtype`` on the compile target, compiled afresh
    (Numba cannot inspect code loaded from its cache)."""
    def kernel(xf, wf, bias, of, xb, r1, r2, ob, uk, ucs):
        block4_s1(xf, wf, bias, of, xb, r1, r2, ob, uk, ucs)

    blk = numba.njit(cache=False, nogil=True)(kernel)
    a = numba.from_dtype(np.dtype(dtype))[::1]
    u = numba.uintp
    sig = (a, a, a, a, u, u, u, u, u, u)
    blk.compile(sig)
    return blk.inspect_asm(sig)


def plane_asm(dtype=np.float32):
    """Machine code of the streaming kernel's plane block (:data:`_PLANE8`: 8 vectors of output
    pixels, all taps of a kernel row per inner loop) for ``dtype`` on the compile target,
    compiled afresh."""
    def kernel(wf, xf, tmp, wb, xb, r_, s_, dw, ws_t, of, ob, bias, k):
        _PLANE8(wf, xf, tmp, wb, xb, r_, 1, s_, 0, 0, dw, ws_t, s_, of, ob, 0, bias, k, 1)

    fn = numba.njit(cache=False, nogil=True)(kernel)
    a, i = numba.from_dtype(np.dtype(dtype))[::1], numba.int64
    sig = (a, a, a, i, i, i, i, i, i, a, i, a, i)
    fn.compile(sig)
    return fn.inspect_asm(sig)


def sweep_asm(dtype=np.float32):
    """Machine code of the NCHW phase planes' row-pair sweep (:data:`_SWEEP_PAIR_S1`: 2 rows x
    9 taps per vector of output pixels) for ``dtype`` on the compile target, compiled afresh."""
    def kernel(buf, offs, extra, wf, kk, b, of, dst, dstride, q0, n):
        _SWEEP_PAIR_S1(buf, offs, extra, wf, kk, b, of, dst, dstride, q0, n)

    fn = numba.njit(cache=False, nogil=True)(kernel)
    t = numba.from_dtype(np.dtype(dtype))
    a, i = t[::1], numba.int64
    sig = (a, numba.uintp[::1], i, a, i, t, a, i, i, i, i)
    fn.compile(sig)
    return fn.inspect_asm(sig)
