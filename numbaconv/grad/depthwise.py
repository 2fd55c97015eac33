"""Backward pass of depthwise convolutions (``groups == C``, multiplier ``m = K / C``).

Depthwise layers do only ``R*S`` multiply-adds per value, so the backward pass is bound by
memory traffic and -- at MobileNet's sizes, where torch needs 0.2-0.5 ms -- by fixed costs:
every extra pass over a tensor, scratch buffer to zero or ``prange`` region (~10-20 us
each) shows.  So each layout runs ONE parallel region that produces all three gradients.

**NCHW** (:func:`_nchw`): one job per (input channel, image) plane, in per-thread chunks.
Per plane, everything happens in cache on per-thread scratch of pitch ``P``:

* ``x`` is split into its ``sh x sw`` stride phases, ``xph[a, b][u, v] = x_pad[u*sh + a,
  v*sw + b]``: tap ``(r, s)`` then reads phase ``(r*dh % sh, s*dw % sw)`` at the fixed
  offset ``(r*dh // sh, s*dw // sw)`` from the output pixel, whatever the stride;
* ``dy`` is copied (summed on the way: grad-bias) into a zero-bordered plane ``D`` of
  the same pitch;
* grad-weight: one flat sweep over ``D`` with ``R*S`` accumulators, each tap a fixed shift
  into the phases (3x3: all nine taps in ONE vectorised loop);
* grad-input: per phase, a gather of the taps that land in it (stride 1 3x3: one 9-tap
  sweep, the forward convolution of ``dy`` with the flipped filter), then the phases are
  interleaved back into ``dx``.

The sweeps run over whole rows of pitch ``P`` (a few zero columns per row) so there is no
per-row loop overhead or scalar border code; the zero columns of ``D`` cancel the values
they meet.  Chunks keep private grad-weight / grad-bias partials, summed at the end.

**NHWC** (:func:`_nhwc_dw_db`): vectorised over channels; grad-weight and grad-bias in one
region, per-thread partials over chunks of output rows.  With stride 1 and ``m = 1`` the
pixels of a tap form one contiguous run of ``x`` and ``dy``, swept ``pix`` pixels at a time
into ``R*S`` replicated accumulator rows (``pix * K`` values, ~512: long vector loops even
with 32 channels); otherwise one channel loop per pixel.  With ``m = 1`` and three tap
columns, output rows go in pairs and a tap row's three taps in one loop
(:func:`_pair3`): 2 FMAs per accumulator load/store instead of 1 (dw_s1 grad-weight
0.40 -> 0.22 ms single-threaded).  Grad-input with stride 1
and ``m = 1`` is the forward depthwise convolution of ``dy`` with the flipped filter
(:func:`numbaconv.cpu.depthwise.run`), otherwise a direct gather per input row.
"""

import numba
import numpy as np
from numba import prange

from ..cpu._jit import jit, pjit, valid_range
from ..cpu.depthwise import _fill_phases
from ..problem import ConvProblem

__all__ = ["depthwise_backward"]


# --- NCHW ---------------------------------------------------------------------------------------
# Rows are short (14 .. 112 values): a plain vectorised loop would run most of them in its
# scalar remainder, so rows are copied 8 values at a time with an overlapping last block.
@jit(inline="always")
def _copy8(dst, d0, src, s0):
    """dst[d0:d0+8] = src[s0:s0+8]: all loads before all stores, so the two (possibly
    aliasing, as far as LLVM knows) arrays still give one vector load and one store."""
    v0, v1, v2, v3 = src[s0], src[s0 + np.uintp(1)], src[s0 + np.uintp(2)], src[s0 + np.uintp(3)]
    v4, v5, v6, v7 = src[s0 + np.uintp(4)], src[s0 + np.uintp(5)], src[s0 + np.uintp(6)], src[s0 + np.uintp(7)]
    dst[d0], dst[d0 + np.uintp(1)], dst[d0 + np.uintp(2)], dst[d0 + np.uintp(3)] = v0, v1, v2, v3
    dst[d0 + np.uintp(4)], dst[d0 + np.uintp(5)], dst[d0 + np.uintp(6)], dst[d0 + np.uintp(7)] = v4, v5, v6, v7


@jit(inline="always")
def _copy_row(dst, d0, src, s0, n):
    """dst[d0 + j] = src[s0 + j] for j < n (dst and src never overlap)."""
    u8 = np.uintp(8)
    if n >= 8:
        un = np.uintp(n)
        j = np.uintp(0)
        while j + u8 <= un:
            _copy8(dst, d0 + j, src, s0 + j)
            j += u8
        if j < un:
            j = un - u8
            _copy8(dst, d0 + j, src, s0 + j)
    else:
        for t in range(np.uintp(n)):
            dst[d0 + t] = src[s0 + t]


@jit(inline="always")
def _copy_strided(dst, d0, ds, src, s0, ss, n):
    """dst[d0 + j*ds] = src[s0 + j*ss] for j < n."""
    for t in range(np.uintp(n)):
        dst[d0 + t * ds] = src[s0 + t * ss]


@jit
def _plane_sum(dy, n, k, s):
    """s + the sum of dy[n, k] (one flat loop over the contiguous plane)."""
    plane = dy.shape[2] * dy.shape[3]
    ys = dy.ravel()[(n * dy.shape[1] + k) * plane:]
    for q in range(np.uintp(plane)):
        s += ys[q]
    return s


@jit
def _interleave2(dst, d0, src, s_even, s_odd, n):
    """dst[d0 + 2t] = src[s_even + t], dst[d0 + 2t + 1] = src[s_odd + t] for t < n."""
    d = dst[d0:]
    se = src[s_even:]
    so = src[s_odd:]
    u1 = np.uintp(1)
    u2 = np.uintp(2)
    for t in range(np.uintp(n)):
        d[t * u2] = se[t]
        d[t * u2 + u1] = so[t]


@jit
def _fill_d(dy, n, k, d, oy, ox, pq):
    """d[(oy + i) * pq + ox + j] = dy[n, k, i, j]."""
    k_, ho_, wo_ = dy.shape[1], dy.shape[2], dy.shape[3]
    yf = dy.ravel()
    for i in range(ho_):
        _copy_row(d, np.uintp((oy + i) * pq + ox), yf, np.uintp(((n * k_ + k) * ho_ + i) * wo_), wo_)


@jit
def _dw_sweep9(d, d0, xs, o, length, acc, a0):
    """acc[a0 + t] += sum_q d[d0 + q] * xs[o[t] + q] for the nine taps t, q < length."""
    e0, e1, e2 = np.uintp(o[0]), np.uintp(o[1]), np.uintp(o[2])
    e3, e4, e5 = np.uintp(o[3]), np.uintp(o[4]), np.uintp(o[5])
    e6, e7, e8 = np.uintp(o[6]), np.uintp(o[7]), np.uintp(o[8])
    t0, t1, t2 = acc[a0], acc[a0 + 1], acc[a0 + 2]
    t3, t4, t5 = acc[a0 + 3], acc[a0 + 4], acc[a0 + 5]
    t6, t7, t8 = acc[a0 + 6], acc[a0 + 7], acc[a0 + 8]
    ds = d[d0:]
    for q in range(np.uintp(length)):
        v = ds[q]
        t0 += v * xs[e0 + q]
        t1 += v * xs[e1 + q]
        t2 += v * xs[e2 + q]
        t3 += v * xs[e3 + q]
        t4 += v * xs[e4 + q]
        t5 += v * xs[e5 + q]
        t6 += v * xs[e6 + q]
        t7 += v * xs[e7 + q]
        t8 += v * xs[e8 + q]
    acc[a0], acc[a0 + 1], acc[a0 + 2] = t0, t1, t2
    acc[a0 + 3], acc[a0 + 4], acc[a0 + 5] = t3, t4, t5
    acc[a0 + 6], acc[a0 + 7], acc[a0 + 8] = t6, t7, t8


@jit
def _dw_sweep1(d, d0, xs, o, length, acc, a):
    t = acc[a]
    ds = d[d0:]
    xo = xs[o:]
    for q in range(np.uintp(length)):
        t += ds[q] * xo[q]
    acc[a] = t


@jit
def _dx_sweep9(d, e, wk, out, q0, length, add):
    """out[q0 + q] (+)= sum_t wk[t] * d[e[t] + q] for the nine taps t, q < length."""
    e0, e1, e2 = np.uintp(e[0]), np.uintp(e[1]), np.uintp(e[2])
    e3, e4, e5 = np.uintp(e[3]), np.uintp(e[4]), np.uintp(e[5])
    e6, e7, e8 = np.uintp(e[6]), np.uintp(e[7]), np.uintp(e[8])
    w0, w1, w2, w3, w4, w5, w6, w7, w8 = wk[0], wk[1], wk[2], wk[3], wk[4], wk[5], wk[6], wk[7], wk[8]
    os_ = out[q0:]
    if add:
        for q in range(np.uintp(length)):
            os_[q] += (w0 * d[e0 + q] + w1 * d[e1 + q] + w2 * d[e2 + q] + w3 * d[e3 + q] + w4 * d[e4 + q]
                       + w5 * d[e5 + q] + w6 * d[e6 + q] + w7 * d[e7 + q] + w8 * d[e8 + q])
    else:
        for q in range(np.uintp(length)):
            os_[q] = (w0 * d[e0 + q] + w1 * d[e1 + q] + w2 * d[e2 + q] + w3 * d[e3 + q] + w4 * d[e4 + q]
                      + w5 * d[e5 + q] + w6 * d[e6 + q] + w7 * d[e7 + q] + w8 * d[e8 + q])


@jit
def _dx_sweep4(d, e0, e1, e2, e3, w0, w1, w2, w3, out, q0, length, add):
    """out[q0 + q] (+)= sum of four taps w_t * d[e_t + q], q < length."""
    os_ = out[q0:]
    d0 = d[e0:]
    d1 = d[e1:]
    d2 = d[e2:]
    d3 = d[e3:]
    if add:
        for q in range(np.uintp(length)):
            os_[q] += w0 * d0[q] + w1 * d1[q] + w2 * d2[q] + w3 * d3[q]
    else:
        for q in range(np.uintp(length)):
            os_[q] = w0 * d0[q] + w1 * d1[q] + w2 * d2[q] + w3 * d3[q]


@jit
def _dx_sweep2(d, e0, e1, w0, w1, out, q0, length, add):
    os_ = out[q0:]
    d0 = d[e0:]
    d1 = d[e1:]
    if add:
        for q in range(np.uintp(length)):
            os_[q] += w0 * d0[q] + w1 * d1[q]
    else:
        for q in range(np.uintp(length)):
            os_[q] = w0 * d0[q] + w1 * d1[q]


@jit
def _dx_sweep1(d, e, wv, out, q0, length, add):
    os_ = out[q0:]
    ds = d[e:]
    if add:
        for q in range(np.uintp(length)):
            os_[q] += wv * ds[q]
    else:
        for q in range(np.uintp(length)):
            os_[q] = wv * ds[q]


@jit
def _merge_phases(xs, dx, n, c, sh, sw, pt, pl, hq, pq):
    """dx[n, c, y, x] = xs[((y+pt) % sh * sw + (x+pl) % sw), (y+pt) // sh, (x+pl) // sw] (0 off the phases)."""
    c_, h_, w_ = dx.shape[1], dx.shape[2], dx.shape[3]
    df = dx.ravel()
    for y in range(h_):
        a = (y + pt) % sh
        u = (y + pt) // sh
        row = ((n * c_ + c) * h_ + y) * w_
        if u >= hq:
            for x in range(np.uintp(w_)):
                df[np.uintp(row) + x] = 0
            continue
        if sw == 2:  # both column phases in one loop: vector stores merged by shuffles
            p0 = (a * 2 * hq + u) * pq
            xe = pl % 2
            v0 = (xe + pl) // 2
            pairs = max(0, min((w_ - xe) // 2, pq - v0))
            _interleave2(df, np.uintp(row + xe), xs, np.uintp(p0 + v0), np.uintp(p0 + hq * pq + v0), pairs)
            x = 0
            while x < w_:  # the (at most one) pixel before the pairs, and those after
                if x >= xe:
                    x = max(x, xe + 2 * pairs)
                    if x >= w_:
                        break
                v = (x + pl) // 2
                df[row + x] = xs[p0 + (x + pl) % 2 * hq * pq + v] if v < pq else 0
                x += 1
            continue
        for b in range(sw):
            lo, hi = valid_range(b - pl, sw, w_, pq)
            src = np.uintp(((a * sw + b) * hq + u) * pq + lo)
            d0 = np.uintp(row + lo * sw + b - pl)
            if sw == 1:
                _copy_row(df, d0, xs, src, hi - lo)
            else:
                _copy_strided(df, d0, np.uintp(sw), xs, src, np.uintp(1), hi - lo)
            v = max(hi, lo)  # pixels past the phases' last column: no tap reaches them
            while v * sw + b - pl < w_:
                df[row + v * sw + b - pl] = 0
                v += 1


@pjit
def _nchw(x, w, dy, dx, dwp, dbp, dwt, db, c_, h_, w_, sh, sw, pt, pl, dh, dw, want_dx, want_dw, want_db):
    """All three gradients of an NCHW depthwise problem; ``dwp`` / ``dbp``: per-chunk partials."""
    n_, k_, ho_, wo_ = dy.shape
    r_, s_ = w.shape[2], w.shape[3]
    chunks = dwp.shape[0]
    m = k_ // c_
    rs_ = r_ * s_
    oy = (r_ - 1) * dh // sh
    ox = (s_ - 1) * dw // sw
    pq = wo_ + ox  # pitch of every scratch plane
    hq = ho_ + oy + 1  # phase rows (+ one slack row for the column overrun of the flat sweeps)
    hd = ho_ + 2 * oy + 2  # rows of D: dy at (oy, ox), zeros around
    phases = sh * sw
    nine = r_ == 3 and s_ == 3
    # per tap: flat offset into the phases (grad-weight) and into D (grad-input gather)
    xo = np.empty(rs_, dtype=np.intp)
    de = np.empty(rs_, dtype=np.intp)
    tph = np.empty(rs_, dtype=np.intp)
    for r in range(r_):
        for s in range(s_):
            ph = (r * dh % sh) * sw + s * dw % sw
            offr, offs = r * dh // sh, s * dw // sw
            tph[r * s_ + s] = ph
            xo[r * s_ + s] = (ph * hq + offr) * pq + offs
            de[r * s_ + s] = (oy - offr) * pq + ox - offs
    xf = x.ravel()
    # stride 1, 3x3: grad-input is one 9-tap sweep over the rows holding real pixels
    u_lo = min(pt, hq)
    u_hi = min(hq, pt + h_)
    jobs = c_ * n_
    for t in prange(chunks):
        xs = np.zeros(phases * hq * pq if want_dw else 1, dtype=dy.dtype)
        d = np.zeros(hd * pq, dtype=dy.dtype)
        dxs = np.zeros(phases * hq * pq if want_dx else 1, dtype=dy.dtype)
        wk = np.empty(rs_, dtype=dy.dtype)
        sel = np.empty(rs_, dtype=np.intp)
        pw = dwp[t].ravel()
        pw[:] = 0
        pb = dbp[t]
        pb[:] = 0
        for job in range(t * jobs // chunks, (t + 1) * jobs // chunks):
            c = job // n_
            n = job % n_
            if want_dw:
                _fill_phases(xf, (n * c_ + c) * h_ * w_, h_, w_, xs, sh, sw, hq, pq, pt, pl)
            for kk in range(m):
                k = c * m + kk
                if want_db:
                    pb[k] = _plane_sum(dy, n, k, pb[k])
                if not (want_dw or want_dx):
                    continue
                _fill_d(dy, n, k, d, oy, ox, pq)
                if want_dw:
                    if nine:
                        _dw_sweep9(d, oy * pq + ox, xs, xo, ho_ * pq, pw, k * 9)
                    else:
                        for tap in range(rs_):
                            _dw_sweep1(d, oy * pq + ox, xs, xo[tap], ho_ * pq, pw, k * rs_ + tap)
                if want_dx:
                    for tap in range(rs_):  # flipped order does not matter: taps are summed
                        wk[tap] = w[k, 0, tap // s_, tap % s_]
                    if nine and phases == 1:
                        if u_hi > u_lo:
                            _dx_sweep9(d, de + u_lo * pq, wk, dxs, u_lo * pq, (u_hi - u_lo) * pq, kk > 0)
                    else:
                        for ph in range(phases):
                            # the phase's taps, up to four per pass over its plane
                            nt = 0
                            for tap in range(rs_):
                                if tph[tap] == ph:
                                    sel[nt] = tap
                                    nt += 1
                            first = kk == 0
                            if nt == 0 and first:  # no tap lands in this phase
                                dxs[ph * hq * pq:(ph + 1) * hq * pq] = 0
                            q0 = ph * hq * pq
                            done = 0
                            while done < nt:
                                left = nt - done
                                t0 = sel[done]
                                if left >= 4:
                                    t1, t2, t3 = sel[done + 1], sel[done + 2], sel[done + 3]
                                    _dx_sweep4(d, de[t0], de[t1], de[t2], de[t3], wk[t0], wk[t1], wk[t2], wk[t3],
                                               dxs, q0, hq * pq, not first)
                                    done += 4
                                elif left >= 2:
                                    t1 = sel[done + 1]
                                    _dx_sweep2(d, de[t0], de[t1], wk[t0], wk[t1], dxs, q0, hq * pq, not first)
                                    done += 2
                                else:
                                    _dx_sweep1(d, de[t0], wk[t0], dxs, q0, hq * pq, not first)
                                    done += 1
                                first = False
            if want_dx:
                _merge_phases(dxs, dx, n, c, sh, sw, pt, pl, hq, pq)
    if want_dw:
        for k in range(k_):
            for tap in range(rs_):
                v = dwp[0, k, tap]
                for t in range(1, chunks):
                    v += dwp[t, k, tap]
                dwt[k, 0, tap // s_, tap % s_] = v
    if want_db:
        for k in range(k_):
            v = dbp[0, k]
            for t in range(1, chunks):
                v += dbp[t, k]
            db[k] = v


# --- NHWC ---------------------------------------------------------------------------------------
@jit
def _db_row(bacc, yf, y0, wo_, k_, pix):
    """bacc[p*K + k] += dy row's channel k at pixels p (mod pix)."""
    for j0 in range(0, wo_, pix):
        ys = yf[y0 + j0 * k_:]
        for q in range(np.uintp(min(pix, wo_ - j0) * k_)):
            bacc[q] += ys[q]


@jit
def _run1(acc, a0, yf, y0, xf, x0, n):
    """acc[a0 + q] += yf[y0 + q] * xf[x0 + q] for q < n."""
    ar = acc[a0:]
    ys = yf[y0:]
    xs = xf[x0:]
    for q in range(np.uintp(n)):
        ar[q] += ys[q] * xs[q]


@jit
def _phase_row2(xf, src, w_, c_, ph, dst, vq):
    """ph[dst + (b*vq + v)*C + c] = x row at ``src``, pixel 2v + b, channel c."""
    for x in range(w_):
        _copy_row(ph, np.uintp(dst + ((x % 2) * vq + x // 2) * c_), xf, np.uintp(src + x * c_), c_)


@jit
def _pair3(acc, a0, pk, yf, ya, yb, xf, xa, xb, e0, e1, e2, n):
    """Three taps (at offsets e0, e1, e2) of one tap row for two output rows a, b:
    acc[a0 + s*pk + q] += dy_a[q] * x_a[q + e_s] + dy_b[q] * x_b[q + e_s], q < n."""
    a_0 = acc[a0:]
    a_1 = acc[a0 + pk:]
    a_2 = acc[a0 + 2 * pk:]
    y_a = yf[ya:]
    y_b = yf[yb:]
    x_a = xf[xa:]
    x_b = xf[xb:]
    u0 = np.uintp(e0)
    u1 = np.uintp(e1)
    u2 = np.uintp(e2)
    for q in range(np.uintp(n)):
        u = y_a[q]
        v = y_b[q]
        a_0[q] += u * x_a[q + u0] + v * x_b[q + u0]
        a_1[q] += u * x_a[q + u1] + v * x_b[q + u1]
        a_2[q] += u * x_a[q + u2] + v * x_b[q + u2]


@jit
def _taps_runs(acc, r, pk, yf, yrow, xf, xrow, c_, k_, w_, wo_, sw, pl, dw, s_, pix, ex_lo, ex_hi):
    """m = 1: taps (r, 0..S-1) of one output row (dy at ``yrow``, the tap row's x pixels
    from ``xrow``), leaving out output pixels [ex_lo, ex_hi); stride 1 in runs of ``pix``
    pixels, else pixel by pixel (``pix`` = 1)."""
    for s in range(s_):
        off = s * dw - pl
        l1, h1 = valid_range(off, sw, w_, wo_)
        a0 = (r * s_ + s) * pk
        xo = (xrow + off) * c_
        for part in range(2):
            j_lo, j_hi = (l1, min(h1, ex_lo)) if part == 0 else (max(l1, ex_hi), h1)
            if ex_hi <= ex_lo:
                if part == 1:
                    break
                j_lo, j_hi = l1, h1
            if sw == 1:
                for j0 in range(j_lo, j_hi, pix):
                    _run1(acc, a0, yf, yrow + j0 * k_, xf, xo + j0 * k_, min(pix, j_hi - j0) * k_)
            else:
                for j in range(j_lo, j_hi):
                    _run1(acc, a0, yf, yrow + j * k_, xf, xo + j * sw * k_, k_)


@pjit
def _nhwc_dw_db(x, dy, dwp, dbp, dwt, db, h_, w_, sh, sw, pt, pl, dh, dw, r_, s_, pix, want_dw, want_db):
    """Grad-weight (HWIO ``dwt``) and grad-bias of an NHWC depthwise problem.

    ``dwp[t]`` holds chunk ``t``'s ``R*S`` accumulator rows of ``pix * K`` values (pixel
    ``p`` of a run adds into ``[p*K, (p+1)*K)``), ``dbp[t]`` its ``pix * K`` bias sums."""
    n_, ho_, wo_, k_ = dy.shape
    c_ = x.shape[3]
    chunks = dwp.shape[0]
    m = k_ // c_
    rows = n_ * ho_
    pk = pix * k_
    vq = (w_ + 1) // 2 + 1  # stride 2: pixels per column phase (+1: the offsets' slack)
    uk = np.uintp(k_)
    um = np.uintp(m)
    xf = x.ravel()
    yf = dy.ravel()
    for t in prange(chunks):
        acc = dwp[t].ravel()
        acc[:] = 0
        bacc = dbp[t]
        bacc[:] = 0
        ph = np.zeros(4 * vq * c_ if sw == 2 and m == 1 and want_dw else 1, dtype=dy.dtype)
        eo = np.empty(3, dtype=np.intp)
        row = t * rows // chunks
        row_end = (t + 1) * rows // chunks
        while row < row_end:
            n = row // ho_
            i = row % ho_
            # two output rows at once (m = 1, 3 columns of taps): each accumulator load and
            # store then serves two FMAs, each dy vector three
            pair = m == 1 and s_ == 3 and want_dw and row + 1 < row_end and i + 1 < ho_
            for rr in range(2 if pair else 1):
                if want_db:
                    _db_row(bacc, yf, (row + rr) * wo_ * k_, wo_, k_, pix)
            if not want_dw:
                row += 1
                continue
            if pair:
                lo, hi = valid_range(-pl, sw, w_, wo_)
                lo2, hi2 = valid_range(2 * dw - pl, sw, w_, wo_)
                lo, hi = max(lo, lo2), min(hi, hi2)
                ya = row * wo_ * k_
                yb = ya + wo_ * k_
                for r in range(r_):
                    ha = i * sh + r * dh - pt
                    hb = ha + sh
                    va = 0 <= ha < h_
                    vb = 0 <= hb < h_
                    ex_lo, ex_hi = 0, 0
                    if va and vb and hi > lo and sw == 2:
                        # stride 2: both x rows split into column phases (ph[row, b, v] =
                        # x[h, 2v + b]), where a tap's pixels are one contiguous run again
                        _phase_row2(xf, (n * h_ + ha) * w_ * c_, w_, c_, ph, 0, vq)
                        _phase_row2(xf, (n * h_ + hb) * w_ * c_, w_, c_, ph, 2 * vq * c_, vq)
                        for s in range(3):
                            col = s * dw - pl
                            b = col % 2
                            eo[s] = (b * vq + (col - b) // 2) * c_
                        emin = min(eo[0], min(eo[1], eo[2]))
                        for j0 in range(lo, hi, pix):
                            _pair3(acc, r * 3 * pk, pk, yf, ya + j0 * k_, yb + j0 * k_, ph, emin + j0 * c_,
                                   2 * vq * c_ + emin + j0 * c_, eo[0] - emin, eo[1] - emin, eo[2] - emin,
                                   min(pix, hi - j0) * k_)
                        ex_lo, ex_hi = lo, hi
                    elif va and vb and hi > lo:
                        xa = ((n * h_ + ha) * w_ - pl) * c_
                        xb = ((n * h_ + hb) * w_ - pl) * c_
                        step = pix if sw == 1 else 1  # runs only where pixels are contiguous
                        for j0 in range(lo, hi, step):
                            _pair3(acc, r * 3 * pk, pk, yf, ya + j0 * k_, yb + j0 * k_, xf, xa + j0 * sw * k_,
                                   xb + j0 * sw * k_, 0, dw * c_, 2 * dw * c_, min(step, hi - j0) * k_)
                        ex_lo, ex_hi = lo, hi
                    if va:
                        _taps_runs(acc, r, pk, yf, ya, xf, (n * h_ + ha) * w_, c_, k_, w_, wo_, sw, pl, dw, s_,
                                   pix, ex_lo, ex_hi)
                    if vb:
                        _taps_runs(acc, r, pk, yf, yb, xf, (n * h_ + hb) * w_, c_, k_, w_, wo_, sw, pl, dw, s_,
                                   pix, ex_lo, ex_hi)
                row += 2
                continue
            yrow = row * wo_ * k_
            for r in range(r_):
                hi = i * sh + r * dh - pt
                if hi < 0 or hi >= h_:
                    continue
                xrow = (n * h_ + hi) * w_
                if m == 1:  # stride 1: pix pixels of x and dy at once (contiguous, same channel pattern)
                    _taps_runs(acc, r, pk, yf, yrow, xf, xrow, c_, k_, w_, wo_, sw, pl, dw, s_, pix, 0, 0)
                    continue
                for s in range(s_):
                    off = s * dw - pl
                    lo, hj = valid_range(off, sw, w_, wo_)
                    ar = acc[(r * s_ + s) * pk:]
                    for j in range(lo, hj):
                        y0 = np.uintp(yrow + j * k_)
                        x0 = np.uintp((xrow + j * sw + off) * c_)
                        if m == 1:
                            for q in range(uk):
                                ar[q] += yf[y0 + q] * xf[x0 + q]
                        else:
                            for q in range(uk):
                                ar[q] += yf[y0 + q] * xf[x0 + q // um]
            row += 1
    if want_dw:
        for tap in range(r_ * s_):
            for k in range(k_):
                v = dwp[0, tap * pk + k]
                for t in range(chunks):
                    for p in range(pix):
                        if t > 0 or p > 0:
                            v += dwp[t, tap * pk + p * k_ + k]
                dwt[tap // s_, tap % s_, 0, k] = v
    if want_db:
        for k in range(k_):
            v = dbp[0, k]
            for t in range(chunks):
                for p in range(pix):
                    if t > 0 or p > 0:
                        v += dbp[t, p * k_ + k]
            db[k] = v


@pjit
def _nhwc_dx(w_hwio, dy, dx, sh, sw, pt, pl, dh, dw):
    """Grad-input of an NHWC depthwise problem, one job per input row (a gather)."""
    n_, h_, w_, c_ = dx.shape
    r_, s_, k_ = w_hwio.shape[0], w_hwio.shape[1], w_hwio.shape[3]
    ho_, wo_ = dy.shape[1], dy.shape[2]
    m = k_ // c_
    wf = w_hwio.ravel()
    dyf = dy.ravel()
    dxf = dx.ravel()
    for job in prange(n_ * h_):
        n = job // h_
        hi = job % h_
        base = np.uintp(job * w_ * c_)
        for q in range(np.uintp(w_ * c_)):
            dxf[base + q] = 0
        for r in range(r_):
            num = hi + pt - r * dh
            if num < 0 or num % sh != 0 or num // sh >= ho_:
                continue
            i = num // sh
            for s in range(s_):
                off = s * dw - pl
                lo, hi_j = valid_range(off, sw, w_, wo_)
                w0 = np.uintp((r * s_ + s) * k_)
                for j in range(lo, hi_j):
                    d0 = np.uintp((job * w_ + j * sw + off) * c_)
                    y0 = np.uintp(((n * ho_ + i) * wo_ + j) * k_)
                    if m == 1:
                        for c in range(np.uintp(c_)):
                            dxf[d0 + c] += dyf[y0 + c] * wf[w0 + c]
                    else:
                        for k in range(np.uintp(k_)):
                            dxf[d0 + k // np.uintp(m)] += dyf[y0 + k] * wf[w0 + k]


# --- driver -------------------------------------------------------------------------------------
def _dx_by_forward(p):
    """Stride 1, multiplier 1, no side padded beyond the dilated kernel's reach: grad-input is
    the forward depthwise convolution of ``dy`` with the flipped filter."""
    reach_h, reach_w = p.dil_h * (p.r - 1), p.dil_w * (p.s - 1)
    return (p.stride_h == 1 and p.stride_w == 1 and p.k == p.c
            and max(p.pad_top, p.pad_bottom) <= reach_h and max(p.pad_left, p.pad_right) <= reach_w)


def _dx_forward(p, w_k, dy):
    from ..cpu.depthwise import run

    reach_h, reach_w = p.dil_h * (p.r - 1), p.dil_w * (p.s - 1)
    w_oihw = w_k if p.layout == "NCHW" else w_k.transpose(3, 2, 0, 1)
    w_flip = np.ascontiguousarray(w_oihw[:, :, ::-1, ::-1])
    n, c, h, w = (p.n, p.c, p.h, p.w)
    x_shape = dy.shape
    ho, wo = (x_shape[2], x_shape[3]) if p.layout == "NCHW" else (x_shape[1], x_shape[2])
    q = ConvProblem(n=n, c=p.k, h=ho, w=wo, k=c, r=p.r, s=p.s, stride_h=1, stride_w=1,
                    pad_top=reach_h - p.pad_top, pad_bottom=reach_h - p.pad_bottom,
                    pad_left=reach_w - p.pad_left, pad_right=reach_w - p.pad_right,
                    dil_h=p.dil_h, dil_w=p.dil_w, groups=c, padding_mode="zeros", layout=p.layout,
                    weight_layout="OIHW", dtype=p.dtype)
    dx = np.empty(p.in_shape, dtype=p.dtype)
    run(q, dy, w_flip, None, dx)
    return dx


def _exact_dx(p, w_k, dy):
    """Grad-input by the direct gather of :func:`_nhwc_dx`, which multiplies only the
    (dy, w) pairs torch does (NCHW through transposed copies)."""
    geometry = (p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w)
    if p.layout == "NHWC":
        dx = np.empty(p.in_shape, dtype=p.dtype)
        _nhwc_dx(w_k, dy, dx, *geometry)
        return dx
    dx = np.empty((p.n, p.h, p.w, p.c), dtype=p.dtype)
    _nhwc_dx(np.ascontiguousarray(w_k.transpose(2, 3, 1, 0)), np.ascontiguousarray(dy.transpose(0, 2, 3, 1)), dx,
             *geometry)
    return np.ascontiguousarray(dx.transpose(0, 3, 1, 2))


_DUMMY = {}


def _dummy(dtype):
    key = np.dtype(dtype).str
    a = _DUMMY.get(key)
    if a is None:
        a = _DUMMY[key] = np.zeros((1, 1, 1, 1), dtype=dtype)
    return a


def depthwise_backward(p, x, w_k, dy, want_dx, want_dw, want_db):
    """``(dx, dW, db)`` of the zero-padded depthwise problem ``p`` (``p.cg == 1``).

    ``x`` (C-contiguous, in ``p.layout``; ignored unless ``want_dw``), ``w_k`` the weights
    in the kernel's layout (OIHW for NCHW, HWIO for NHWC), ``dy`` C-contiguous.  Results are
    fresh arrays (``dW`` in ``w_k``'s layout) or ``None`` where not asked for.
    """
    dtype = p.dtype
    threads = numba.get_num_threads()
    dummy = _dummy(dtype)
    geometry = (p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w)
    dx = dwt = db = None
    if want_dx and not np.isfinite(w_k).all():  # C*R*S values: free
        # the fast grad-input sweeps run the filter over zero borders (0 * inf = NaN where
        # torch has no product at all): the exact gather instead
        dx = _exact_dx(p, w_k, dy)
        want_dx = False
        if not (want_dw or want_db):
            return dx, None, None
    if p.layout == "NCHW":
        chunks = max(1, min(threads, p.n * p.c))
        if want_dx:
            dx = np.empty(p.in_shape, dtype=dtype)
        dwt = np.empty(w_k.shape, dtype=dtype) if want_dw else None
        db = np.empty(p.k, dtype=dtype) if want_db else None
        dwp = np.empty((chunks, p.k, p.r * p.s), dtype=dtype)
        dbp = np.empty((chunks, p.k), dtype=dtype)
        _nchw(x if want_dw else dummy, w_k, dy, dx if want_dx else dummy, dwp, dbp,
              dwt if want_dw else dummy, db if want_db else dummy.ravel(), p.c, p.h, p.w, *geometry,
              want_dx, want_dw, want_db)
        return dx, dwt, db
    if want_dx:
        if _dx_by_forward(p):
            dx = _dx_forward(p, w_k, dy)
        else:
            dx = np.empty(p.in_shape, dtype=dtype)
            _nhwc_dx(w_k, dy, dx, *geometry)
    if want_dw or want_db:
        pix = max(1, min(p.wo, 512 // p.k)) if p.k == p.c else 1
        chunks = max(1, min(threads, p.n * p.ho))
        dwt = np.empty(w_k.shape, dtype=dtype) if want_dw else None
        db = np.empty(p.k, dtype=dtype) if want_db else None
        dwp = np.empty((chunks, p.r * p.s * pix * p.k if want_dw else 1), dtype=dtype)
        dbp = np.empty((chunks, pix * p.k), dtype=dtype)
        _nhwc_dw_db(x if want_dw else dummy, dy, dwp, dbp, dwt if want_dw else dummy,
                    db if want_db else dummy.ravel(), p.h, p.w, *geometry, p.r, p.s, pix, want_dw, want_db)
    return dx, dwt, db
