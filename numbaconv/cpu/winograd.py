"""``winograd``: Winograd minimal filtering F(m x m, 3 x 3) for stride-1 3x3 layers.

Per ``m x m`` output tile (Lavin & Gray 2016)::

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A        d: the (m+2) x (m+2) input tile

so a tile's ``9 m^2`` multiplications per channel pair become ``(m+2)^2`` -- 4x fewer for
F(4x4, 3x3), 2.25x for F(2x2, 3x3) -- summed over input channels as ``(m+2)^2`` independent
GEMMs ``M[xi] = V[xi] (tiles x C) . U[xi] (C x K)``.

Blocking (one pass over memory): the work is split into tasks of ``T`` tiles x a run of
output-channel blocks (batch x tile blocks x groups x channel runs, split over the threads by
:class:`numbaconv.cpu._launch.Task`).  A task
transforms its tiles' inputs one channel block at a time into ``V`` (``alpha^2 x T x cb``,
in L2), multiplies them on ``tiled``'s register-blocked micro-kernel
(:func:`numbaconv.cpu._vec.conv_block`: ``P`` tiles x ``V`` output channels, the
transformed weights streamed like ``tiled``'s packed blocks) into ``M`` (``alpha^2 x T x
kw``), and finally transforms ``M`` into output tiles with the bias added
(:func:`numbaconv.cpu._vec.tile_transform`: explicit vectors along the channels, which are
contiguous in the padded NHWC copy both layouts go through).

Transformed weights ``U`` (``G g G^T`` in float64, rounded once) are packed as
``(G, alpha^2, K/G/V, C/G, V)`` and cached like ``tiled``'s packed weights.

Accuracy: the interpolation points are ``0, 1, -1, 1/2, -2`` for F(4x4) (Barabasz et al.,
"Error analysis and improving the accuracy of Winograd convolution": they halve the
float32 error of Lavin's ``0, +-1, +-2`` on inputs of a large dynamic range) and ``0, 1,
-1`` for F(2x2).  The transforms mix every input of a tile into every output of it, so a
non-finite input or weight anywhere in a tile would spoil outputs torch keeps finite:
the output transform returns a non-finite check, and a layer that produced a non-finite
value is computed again by ``tiled``, which propagates NaN and Inf exactly as torch does.

Geometry other than 3x3 / stride 1 / dilation 1, depthwise layers and groups with few
output channels run ``tiled`` (its direct and depthwise kernels).
"""

import dataclasses
import functools
from fractions import Fraction

import numba
import numpy as np

from .. import tuning
from . import tiled
from ._blocking import GEMM_P_CHOICES, empty_aligned
from ._jit import copy_run, jit, scratch
from ._launch import Task, call_at, callee, type_key
from ._vec import conv_block, lanes, target_vector_bytes, tile_transform
from ._wcache import WeightCache
from .epilogue import NONE, after, arg_key, finish_2d

__all__ = ["run", "applies", "profitable", "plan", "matrices", "transformed_weights", "flipped_weights",
           "microkernel_asm", "clear_cache", "tile_size", "POINTS", "WEIGHT_LAYOUTS", "reference"]

#: interpolation points (infinity implied) per output tile size ``m``
POINTS = {2: (0, 1, -1), 4: (0, 1, -1, Fraction(1, 2), -2)}

WEIGHT_LAYOUTS = tiled.WEIGHT_LAYOUTS


@functools.lru_cache(maxsize=None)
def matrices(m, r=3):
    """``(A^T, G, B^T)`` of F(m, r) on :data:`POINTS` ``[m]`` plus infinity, as exact
    :class:`~fractions.Fraction` rows (Toom-Cook: ``B^T``'s rows are the coefficients of
    ``M(x) / (x - p)``, with ``M(x) = prod (x - p)``; its last row, infinity's, those of
    ``M``).  Checked: ``sum_xi A^T[i][xi] G[xi][k] B^T[xi][j] == [j == i + k]``."""
    a = m + r - 1
    pts = [Fraction(p) for p in POINTS[m]]

    def polymul(p, q):
        out = [Fraction(0)] * (len(p) + len(q) - 1)
        for i, u in enumerate(p):
            for j, v in enumerate(q):
                out[i + j] += u * v
        return out

    big_m = [Fraction(1)]
    for p in pts:
        big_m = polymul(big_m, [-p, Fraction(1)])
    bt, g = [], []
    at = [[Fraction(0)] * a for _ in range(m)]
    for j, pj in enumerate(pts):
        q, f = [Fraction(1)], Fraction(1)
        for pl in pts[:j] + pts[j + 1:]:
            q = polymul(q, [-pl, Fraction(1)])
            f *= pj - pl
        bt.append(q + [Fraction(0)] * (a - len(q)))
        g.append([pj ** k / f for k in range(r)])
        for i in range(m):
            at[i][j] = pj ** i
    bt.append(big_m)
    g.append([Fraction(0)] * (r - 1) + [Fraction(1)])
    at[m - 1][a - 1] = Fraction(1)
    for i in range(m):
        for k in range(r):
            for j in range(a):
                s = sum(at[i][x] * g[x][k] * bt[x][j] for x in range(a))
                assert s == (j == i + k), "not a Winograd algorithm: check POINTS"
    return tuple(map(tuple, at)), tuple(map(tuple, g)), tuple(map(tuple, bt))


def reference(d, g, m):
    """F(m, 3) of one input tile ``d`` ((m+2) x (m+2)) and kernel ``g`` (3 x 3) in plain
    Python with exact fractions: the formula the kernels implement, for reading and tests."""
    at, gm, bt = matrices(m)
    a = m + 2

    def mul(x, y):
        return [[sum(x[i][k] * y[k][j] for k in range(len(y))) for j in range(len(y[0]))] for i in range(len(x))]

    def tr(x):
        return [list(r) for r in zip(*x)]

    d = [[Fraction(float(v)) for v in row] for row in d]
    g = [[Fraction(float(v)) for v in row] for row in g]
    u = mul(mul(gm, g), tr(gm))
    v = mul(mul(bt, d), tr(bt))
    mm = [[u[i][j] * v[i][j] for j in range(a)] for i in range(a)]
    return mul(mul(at, mm), tr(at))


# --- kernels -----------------------------------------------------------------------------------
_VB = target_vector_bytes()
#: tiles per micro-kernel call: the largest GEMM block for this target (8 x 2 zmm on AVX-512)
_P = max(GEMM_P_CHOICES[_VB])
#: ... or tiled's largest direct block (14 x 2 zmm) where an image has at least two such blocks
#: of tiles: each transformed weight vector then serves 14 tiles (Intel Xeon, 2 threads, 3
#: interleaved runs: 28x28 256 channels in 8 groups 0.53-0.58 -> 0.45-0.46 ms, batch 8 at 128
#: channels 3.7 -> 3.4 NCHW, 3.1 -> 2.7 NHWC); not below (res5's 16 tiles ran 1.2 -> 1.5 ms in
#: 28 slots)
_P_WIDE = max(tiled.P_CHOICES[_VB])
_GEMM = conv_block(_P, 2, vector_bytes=_VB)
_GEMM_WIDE = conv_block(_P_WIDE, 2, vector_bytes=_VB)


def _floats(mat):
    return tuple(tuple(float(c) for c in row) for row in mat)


_IN2 = tile_transform(_floats(matrices(2)[2]), _VB, False)
_IN4 = tile_transform(_floats(matrices(4)[2]), _VB, False)
_OUT2 = tile_transform(_floats(matrices(2)[0]), _VB, True)
_OUT4 = tile_transform(_floats(matrices(4)[0]), _VB, True)


@jit
def _in_tiles4(xf, vbuf, zeros, n, tb, tt_, ntiles, tw, hp, wp, c_, c0, cl):
    """Input transform of the block's ``tt_`` 6 x 6 tiles (F(4x4)), channels ``[c0, c0 + cl)``
    of the padded NHWC input (``c0`` includes the group's offset), into ``vbuf[xi, t, c]``.
    (One function per tile size, called through its address: a layer compiles only its
    own transform, half of a function that branched on ``m``.)"""
    for t in range(tt_):
        _IN4(xf, vbuf, zeros, _tile_start(4, n, tb, tt_, t, ntiles, tw, hp, wp, c_, c0), wp * c_, c_, t * cl,
             6 * tt_ * cl, tt_ * cl, cl, 0)


@jit
def _in_tiles2(xf, vbuf, zeros, n, tb, tt_, ntiles, tw, hp, wp, c_, c0, cl):
    """:func:`_in_tiles4` for the 4 x 4 tiles of F(2x2)."""
    for t in range(tt_):
        _IN2(xf, vbuf, zeros, _tile_start(2, n, tb, tt_, t, ntiles, tw, hp, wp, c_, c0), wp * c_, c_, t * cl,
             4 * tt_ * cl, tt_ * cl, cl, 0)


@jit(inline="always")
def _tile_start(m, n, tb, tt_, t, ntiles, tw, hp, wp, c_, c0):
    """Where the block's tile ``t`` starts in the flat padded input; past the last tile, the
    last tile again (its results unused)."""
    tile = min(tb * tt_ + t, ntiles - 1)
    return ((n * hp + (tile // tw) * m) * wp + (tile % tw) * m) * c_ + c0


@jit
def _gemms(vbuf, uf, tmp, mbuf, zeros, aa, tt_, cl, wb0, kb_lo, kb_hi, kbg, cg, kw, v_, mode, pb):
    """``mbuf[xi, t, k] (=|+=) sum over c of vbuf[xi, t, c] * U[xi, c, k]`` for every ``xi``
    and the task's channel blocks: ``pb`` tiles (:data:`_P` or :data:`_P_WIDE`, a runtime
    choice: every layer shares this function) x ``V`` channels per micro-kernel call."""
    for xi in range(aa):
        for kb in range(kb_lo, kb_hi):
            wb = wb0 + (xi * kbg + kb) * cg * v_
            if _P_WIDE != _P and pb == _P_WIDE:  # (a constant False where they agree: AVX2)
                for t0 in range(0, tt_, _P_WIDE):
                    _GEMM_WIDE(vbuf, uf, tmp, (xi * tt_ + t0) * cl, wb, 1, 1, 0, 0, cl, v_, 0, cl, mbuf,
                               (xi * tt_ + t0) * kw + (kb - kb_lo) * v_, kw, zeros, 0, mode)
            else:
                for t0 in range(0, tt_, _P):
                    _GEMM(vbuf, uf, tmp, (xi * tt_ + t0) * cl, wb, 1, 1, 0, 0, cl, v_, 0, cl, mbuf,
                          (xi * tt_ + t0) * kw + (kb - kb_lo) * v_, kw, zeros, 0, mode)


@jit
def _out_tile4(mbuf, target, bias, src, ssa, ssb, dst, di, dj, nk, k0):
    """Output transform of one F(4x4) tile (bias added); 0, or NaN when a result is not finite."""
    return _OUT4(mbuf, target, bias, src, ssa, ssb, dst, di, dj, nk, k0)


@jit
def _out_tile2(mbuf, target, bias, src, ssa, ssb, dst, di, dj, nk, k0):
    """:func:`_out_tile4` for F(2x2)."""
    return _OUT2(mbuf, target, bias, src, ssa, ssb, dst, di, dj, nk, k0)


@jit
def _tasks(lo, hi, xf, uf, bias, of, bad, zeros, geo, nchw, nhwc, epi, fns):
    """Tasks ``[lo, hi)`` of the convolution (see :data:`_WINOGRAD`).  A task: tiles ``[tb*tt_,
    (tb+1)*tt_)`` of image ``n``, output-channel blocks ``[kb_lo, kb_hi)`` of group ``g``,
    each output row through the epilogue ``epi`` (None: pruned; see ``epilogue.finish_2d``)
    once written; ``bad[task]``: 0, or NaN when a (pre-epilogue) result is not finite.
    ``nchw, nhwc``: the output layout, ``(True, None)`` or ``(None, True)``: Numba's
    dead-branch pruning resolves ``arg is None`` from the argument's type, so a layer
    compiles only its layout's output path (a bool would compile both).  The task's body is
    written out here, not a function inlined into the loop: Numba's IR inlining took 0.3 s
    of a fresh install's first Winograd layer (Intel Xeon); its buffers are allocated once
    per range of tasks."""
    hp, wp, c_, ho_, wo_, k_, groups, cg, kg, kbg, m, th, tw, tt_, cb, kbr, v_, n_, pb = geo
    a = m + 2
    aa = a * a
    ntiles = th * tw
    ntb = (ntiles + tt_ - 1) // tt_
    nkr = (kbg + kbr - 1) // kbr
    per_n = ntb * groups * nkr
    vbuf = scratch(aa * tt_ * min(cb, cg), of)  # (np.empty: see numbaconv.cpu._jit.scratch)
    mbuf = scratch(aa * tt_ * kbr * v_, of)
    obuf = scratch(tt_ * m * m * kbr * v_, of)
    tmp = scratch(_P_WIDE * v_, of)
    for task in range(lo, hi):
        n = task // per_n
        rest = task % per_n
        tb = rest // (groups * nkr)
        g = (rest // nkr) % groups
        kb_lo = (rest % nkr) * kbr
        kb_hi = min(kbg, kb_lo + kbr)
        kw = (kb_hi - kb_lo) * v_
        # transformed inputs, one channel block at a time, multiplied into M
        for c0 in range(0, cg, cb):
            cl = min(cb, cg - c0)
            call_at(fns, 0, None, (xf, vbuf, zeros, n, tb, tt_, ntiles, tw, hp, wp, c_, g * cg + c0, cl))
            call_at(fns, 2, None, (vbuf, uf, tmp, mbuf, zeros, aa, tt_, cl, (g * aa * kbg * cg + c0) * v_, kb_lo,
                                   kb_hi, kbg, cg, kw, v_, 1 if c0 == 0 else 2, pb))
        # output tiles (bias added in the transform)
        nk = min(kw, kg - kb_lo * v_)
        k0 = g * kg + kb_lo * v_
        nt = min(tt_, ntiles - tb * tt_)
        chk = of.dtype.type(0)
        if nchw is not None:
            # obuf[i, t, j, k]: row i of the block's tiles side by side (pixel q = t*m + j),
            # then each run of tiles on one tile row goes out as NCHW rows, 8 x 8 transposes
            for t in range(nt):
                chk += call_at(fns, 4, chk, (mbuf, obuf, bias, t * kw, a * tt_ * kw, tt_ * kw, t * m * kw,
                                             tt_ * m * kw, kw, nk, k0))
            t = 0
            while t < nt:
                tile = tb * tt_ + t
                y0 = (tile // tw) * m
                x0 = (tile % tw) * m
                run = min(nt - t, tw - tile % tw)
                npix = min(run * m, wo_ - x0)
                for i in range(min(m, ho_ - y0)):
                    row = ((n * k_ + k0) * ho_ + y0 + i) * wo_ + x0
                    tiled.transpose_block(obuf, of, ((i * tt_ + t) * m) * kw, kw, row, ho_ * wo_, npix, nk)
                    if epi is not None:  # (pruned at compile time without an epilogue)
                        finish_2d(of, epi, row, nk, ho_ * wo_, npix)
                t += run
        if nhwc is not None:
            for t in range(nt):
                tile = tb * tt_ + t
                y0 = (tile // tw) * m
                x0 = (tile % tw) * m
                if y0 + m <= ho_ and x0 + m <= wo_:  # a whole tile: straight into the output
                    chk += call_at(fns, 6, chk, (mbuf, of, bias, t * kw, a * tt_ * kw, tt_ * kw,
                                                 ((n * ho_ + y0) * wo_ + x0) * k_ + k0, wo_ * k_, k_, nk, k0))
                    for i in range(m):
                        if epi is not None:  # (pruned at compile time without an epilogue)
                            finish_2d(of, epi, ((n * ho_ + y0 + i) * wo_ + x0) * k_ + k0, m, k_, nk)
                    continue
                chk += call_at(fns, 4, chk, (mbuf, obuf, bias, t * kw, a * tt_ * kw, tt_ * kw, 0, m * kw, kw, nk,
                                             k0))
                for i in range(min(m, ho_ - y0)):
                    for j in range(min(m, wo_ - x0)):
                        copy_run(of, ((n * ho_ + y0 + i) * wo_ + x0 + j) * k_ + k0, obuf, (i * m + j) * kw, nk)
                    if epi is not None:  # (pruned at compile time without an epilogue)
                        finish_2d(of, epi, ((n * ho_ + y0 + i) * wo_ + x0) * k_ + k0, min(m, wo_ - x0), k_,
                                  nk)
        bad[task] = chk


#: the convolution: its tasks = (image, block of ``T`` tiles, group, run of ``kbr`` output-channel
#: blocks), each run by :func:`_tasks`, in parallel.  ``xf``: zero-padded NHWC input ``(N, hp, wp, C)``,
#: flat; ``uf``: packed transformed weights; ``of``: the output in its layout, flat; ``bad[task]``:
#: 0, or NaN where the task produced a non-finite value; ``fns``: :func:`_callees`' addresses
#: of the transforms and GEMMs (called through them: linked in, they were ~1 s of the task's
#: 4.6 s compile on a fresh install, Zen 1).  ``geo``: the geometry's integers ``hp,
#: wp, C, Ho, Wo, K, groups, C/G, K/G, K/G/V, m, th, tw, T, cb, kbr, V, N, P``
#: (``P``: tiles per GEMM block, see :func:`_gemms`).
_WINOGRAD = Task(_tasks)


def _callees(xf, uf, bias, of, zeros, m, nchw):
    """:func:`_tasks`' ``fns`` for these arrays (their Numba types), tile size ``m`` and output
    layout: ``(address, tag)`` of :func:`_in_tiles4` (or 2), :func:`_gemms`, :func:`_out_tile4`
    (or 2) into the task's buffers and, for NHWC, into the output (NCHW never calls it: its
    slot stays empty, and a call would fail the tag check).  Once per combination (``conv2d``
    binds on every call: building them took 0.3 ms of a 0.8 ms res2 layer on Intel Xeon)."""
    key = tuple(type_key(a) for a in (xf, uf, bias, of, zeros)) + (m, nchw)
    fns = _CALLEES.get(key)
    if fns is None:
        fns = _CALLEES[key] = _build_callees(xf, uf, bias, of, zeros, m, nchw)
    return fns


#: type keys of :func:`_callees`' arrays, tile size and layout -> their callee table
_CALLEES = {}


def _build_callees(xf, uf, bias, of, zeros, m, nchw):
    i64 = numba.types.int64
    flat = numba.from_dtype(of.dtype)[::1]  # (the task's own buffers)
    tx, tu, tb, to, tz = (numba.typeof(a) for a in (xf, uf, bias, of, zeros))
    item = numba.from_dtype(of.dtype)
    in_tiles, out_tile = (_in_tiles4, _out_tile4) if m == 4 else (_in_tiles2, _out_tile2)
    fns = (callee(in_tiles, (tx, flat, tz) + (i64,) * 10)
           + callee(_gemms, (flat, tu, flat, flat, tz) + (i64,) * 12)
           + callee(out_tile, (flat, flat, tb) + (i64,) * 8, item)
           + ((0, 0) if nchw else callee(out_tile, (flat, to, tb) + (i64,) * 8, item)))
    return np.array(fns, dtype=np.int64)


# --- weights -----------------------------------------------------------------------------------
#: every size cached: the float64 transform costs ~50x the bit check (0.2 ms for 36 KB)
_CACHE = WeightCache(min_bytes=0)
_cache_stats = _CACHE.stats


def _transform_weights(w, uf, gm, hwio, flip, groups, kg, cg, kbg, v_):
    """``uf`` (packed ``(G, alpha^2, K/G/V, C/G, V)``) = ``G g G^T`` of every 3x3 kernel ``g``
    of ``w`` (OIHW, or HWIO when ``hwio``), in float64, zero past ``K/G``.  ``flip``: the
    kernels of the grad-input convolution instead, ``g[r, s] = w[g*Cg + c, k, 2-r, 2-s]``
    (channels swapped, taps reversed; ``kg``, ``cg`` are that convolution's).

    NumPy: ``U[i, j] = sum over r, s of G[i, r] G[j, s] g[r, s]`` is one matrix product
    ``(alpha^2 x 9) . (9 x kernels)`` per run of output-channel blocks, with the taps
    gathered (and cast to float64) in the packed order so that its result is ``uf``'s rows
    (BLAS, threaded).  As fast as the compiled transform it replaced (512 x 512 channels
    19-26 ms vs 21-34 on Intel Xeon, 2 threads), and nothing to compile: that was 0.6 s of
    a fresh install's first Winograd layer."""
    a2 = gm.shape[0] ** 2
    gk = np.einsum("ir,js->ijrs", gm, gm).reshape(a2, 9)
    o = w.transpose(3, 2, 0, 1) if hwio else w  # (K, C/G, 3, 3) of the layer
    if flip:  # the grad-input convolution's (G, kg, cg, 3, 3)
        o = o.reshape(groups, cg, kg, 3, 3)[..., ::-1, ::-1].transpose(0, 2, 1, 3, 4)
    g4 = o.reshape(groups, kg, cg, 9)  # (a copy where the view cannot be one)
    u4 = uf.reshape(groups, a2, kbg, cg * v_)
    per = max(1, (1 << 21) // (a2 * cg * v_ * 8))  # channel blocks per product: ~2 MiB of result
    taps = np.empty((9, per, cg, v_))  # taps[rs, b, c, v] = g[(kb0 + b) V + v, c, rs]
    for g in range(groups):
        for kb0 in range(0, kbg, per):
            kb1 = min(kbg, kb0 + per)
            lo, hi = kb0 * v_, min(kg, kb1 * v_)
            t = taps[:, :kb1 - kb0]
            full = (hi - lo) // v_
            t[:, :full] = g4[g, lo:lo + full * v_].reshape(full, v_, cg, 9).transpose(3, 0, 2, 1)
            if full < kb1 - kb0:  # the last block's channels past K/G are zero
                t[:, full] = 0
                t[:, full, :, :hi - lo - full * v_] = g4[g, lo + full * v_:hi].transpose(2, 1, 0)
            with np.errstate(all="ignore"):  # (non-finite weights: the layer reruns on tiled)
                u4[g, :, kb0:kb1] = (gk @ t.reshape(9, -1)).reshape(a2, kb1 - kb0, cg * v_)


def transformed_weights(w, wlayout, groups, m, v_, flip=False):
    """``U = G g G^T`` of the 3x3 weights ``w`` (OIHW or HWIO), computed in float64 and
    rounded once, packed ``(G, alpha^2, K/G/V, C/G, V)`` (zero past ``K/G``); cached (a
    training step's new weights cost one pass: 19-26 ms for 512 x 512 channels on Intel
    Xeon).  ``flip``: of the grad-input convolution's kernels (see :func:`_transform_weights`)."""
    def build():
        hwio = wlayout == "HWIO"
        k_, cg = (w.shape[3], w.shape[2]) if hwio else (w.shape[0], w.shape[1])
        if flip:
            k_, cg = cg * groups, k_ // groups
        kg = k_ // groups
        kbg = -(-kg // v_)
        a = m + 2
        uf = empty_aligned(groups * a * a * kbg * cg * v_, w.dtype)  # (vector loads: whole lines)
        _transform_weights(w, uf, np.array(matrices(m)[1], dtype=np.float64), hwio, flip, groups, kg, cg, kbg, v_)
        return uf
    return _CACHE.get((wlayout, groups, m, v_, flip), w, build)


def flipped_weights(w, wlayout, groups):
    """The grad-input convolution's weights as an array (``W_t[g*Cg + c, k, r, s] = W[g*Kg + k,
    c, R-1-r, S-1-s]`` in OIHW; the same in HWIO), for the paths that need them spelled out."""
    if wlayout == "OIHW":
        k_, cg, r_, s_ = w.shape
        w_t = w.reshape(groups, k_ // groups, cg, r_, s_).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
        return np.ascontiguousarray(w_t).reshape(groups * cg, k_ // groups, r_, s_)
    r_, s_, cg, k_ = w.shape
    w_t = w.reshape(r_, s_, cg, groups, k_ // groups)[::-1, ::-1].transpose(0, 1, 4, 3, 2)
    return np.ascontiguousarray(w_t).reshape(r_, s_, k_ // groups, groups * cg)


def clear_cache():
    """Forget every cached transformed weight array."""
    _CACHE.clear()


# --- planning ----------------------------------------------------------------------------------
def applies(p):
    """Winograd runs ``p``: a 3x3, stride-1, undilated layer with enough output channels per
    group to fill the micro-kernel (depthwise and few-channel groups run ``tiled``)."""
    return (p.r == p.s == 3 and p.stride_h == p.stride_w == 1 and p.dil_h == p.dil_w == 1
            and not p.is_depthwise and 4 * p.kg > tiled.block_width(p.dtype))


def profitable(p):
    """Whether ``auto`` should run ``p`` here (measured on Zen 4, numbaconv/auto.py): it
    applies, has 16+ input channels per group (shorter GEMMs do not repay the transforms;
    the tuning knob ``auto.winograd_min_channels``)
    and at least two micro-kernel blocks of tiles (fewer only stream the transformed
    weights: 4x4 outputs at 512 channels ran 0.4-0.8x ``tiled``), and more output channels
    per group than ``tiled``'s narrow blocks take (where they exist)."""
    if not applies(p) or p.cg < tuning.value("auto.winograd_min_channels"):
        return False
    if tiled.narrow_blocks(p.dtype, p.kg, p.groups):
        # (its GEMM's blocks are two registers wide: half empty; tiled's narrow blocks are not
        # -- 16 per group at 28x28, Intel Xeon: 0.72 -> 0.52 ms NCHW, 0.58 -> 0.41 NHWC)
        return False
    m = tile_size(p)
    return p.n * -(-p.ho // m) * -(-p.wo // m) >= 2 * _P


def tile_size(p):
    """``m``: F(4x4) unless the output is so small that 4x4 tiles waste more than F(2x2)'s
    extra multiplications save, or gives the micro-kernel fewer than two blocks of tiles
    (then the GEMMs only stream F(4x4)'s 2.25x larger transformed weights: res5's 7x7
    outputs ran 3x slower in F(4x4) than in F(2x2) on Zen 4)."""
    def tiles(m):
        return p.n * -(-p.ho // m) * -(-p.wo // m)
    if tiles(4) < 2 * _P:
        return 2
    return 4 if tiles(4) * 36 <= 0.8 * tiles(2) * 16 else 2


def plan(p, m=None):
    """Blocking for ``p``: dict(m, V, P tiles per GEMM block, T tiles per task, cb input channels per block, kbr
    output-channel blocks per task, th x tw tiles, hp x wp padded input) (a fresh copy)."""
    return dict(_plan(p, m, numba.get_num_threads(), tuning.generation()))


@functools.lru_cache(maxsize=1024)
def _plan(p, m, threads, _generation):
    """:func:`plan`, once per problem, tile size, thread count and set of tuning knobs
    (``conv2d`` binds on every call: on a small layer the planning cost a fifth of the call)."""
    m = m or tile_size(p)
    v_ = 2 * lanes(_VB, p.dtype.itemsize)
    item = p.dtype.itemsize
    a = m + 2
    th, tw = -(-p.ho // m), -(-p.wo // m)
    kbg = -(-p.kg // v_)
    pb = _P_WIDE if th * tw >= 2 * _P_WIDE else _P  # tiles per GEMM block (see _P_WIDE)
    tt_ = min(2 * pb, -(-(th * tw) // pb) * pb)  # no more tile slots than tiles
    # input channels per block: the block's transformed tiles (alpha^2 x T x cb) within ~512 KiB
    # (half of Zen 4's L2; res5 ran 10 % faster with all 512 channels in one block than in two)
    cb = max(16, tuning.value("winograd.cb_bytes") // (a * a * tt_ * item))
    cb = min(p.cg, cb)
    nblk = -(-p.cg // cb)
    cb = -(-p.cg // nblk)
    while tt_ > pb and p.n * -(-(th * tw) // tt_) * p.groups * kbg < threads:
        tt_ -= pb
    # output channels per task: M (alpha^2 x T x kw) within ~512 KiB, and the runs split so
    # the threads finish together: the least rounds x (channel blocks per task + the input
    # transform each run repeats, ~half a block's GEMMs), then the fewest runs.  (res4 ran
    # 0.72 ms in 3 tasks of (3, 3, 2) blocks on 2 threads, 0.50 ms in 2 of 4; res2 0.53 ms
    # in 26 tasks of 1 block, 0.46 ms in 13 of 2)
    kbr_max = max(1, min(kbg, tuning.value("winograd.m_bytes") // (a * a * tt_ * v_ * item)))
    other = p.n * -(-(th * tw) // tt_) * p.groups

    def span(nkr):
        return -(-(other * nkr) // threads) * (-(-kbg // nkr) + 0.5)
    kbr = -(-kbg // min(range(-(-kbg // kbr_max), kbg + 1), key=lambda nkr: (span(nkr), nkr)))
    return dict(m=m, V=v_, P=pb, T=tt_, cb=cb, kbr=kbr, kbg=kbg, th=th, tw=tw, hp=th * m + 2, wp=tw * m + 2)


#: ``run`` takes ``epi=`` and applies it in the output transform's stores (numbaconv.cpu.epilogue)
FUSES_EPILOGUE = True


def run(p, x, w, bias, out, m=None, flip=False, epi=NONE):
    """``w`` is OIHW for NCHW and HWIO for NHWC (:data:`WEIGHT_LAYOUTS`, as ``tiled``).
    ``flip``: ``w`` are the weights of the layer whose grad-input ``p`` is; the convolution
    runs with :func:`flipped_weights` of them (transformed straight from ``w``).  ``epi``:
    the fused epilogue."""
    bind(p, w, bias, m, flip)(x, out, epi)


def bind(p, w, bias, m=None, flip=False, prepared=False):
    """:func:`run`'s plan and transformed weights for ``p``, as a function of ``(x, out, epi)``
    (``prepared``: a plan's binding, see ``tiled.bind``)."""
    wlayout = dict(WEIGHT_LAYOUTS)[p.layout]
    if not applies(p):
        return tiled.bind(p, flipped_weights(w, wlayout, p.groups) if flip else w, bias, prepared=prepared)
    if max(p.pad_top, p.pad_bottom, p.pad_left, p.pad_right) > 2:
        return after(lambda x, out: _run_live(p, x, w, bias, out, m, flip))
    b = plan(p, m)
    nchw = p.layout == "NCHW"
    layout = (True, None) if nchw else (None, True)  # (see _tasks)
    in_place = not nchw and p.h == b["hp"] and p.w == b["wp"] and not p.has_padding
    padded_shape = (p.n, b["hp"], b["wp"], p.c)
    uf = transformed_weights(np.ascontiguousarray(w), wlayout, p.groups, b["m"], b["V"], flip)
    bp = np.zeros(p.k, dtype=p.dtype) if bias is None else bias
    zeros = np.zeros(b["V"], dtype=p.dtype)
    ntasks = p.n * -(-(b["th"] * b["tw"]) // b["T"]) * p.groups * -(-b["kbg"] // b["kbr"])
    geo = np.array([b["hp"], b["wp"], p.c, p.ho, p.wo, p.k, p.groups, p.cg, p.kg, b["kbg"], b["m"], b["th"], b["tw"],
                    b["T"], b["cb"], b["kbr"], b["V"], p.n, b["P"]], dtype=np.int64)

    def call(x, out, epi):
        if in_place:
            xp = x  # NHWC without padding, whole tiles: already the layout the transforms read
        else:
            xp = np.empty(padded_shape, dtype=p.dtype)
            tiled._pad_to_nhwc(x, xp, nchw, p.pad_top, p.pad_left, p.h, p.w, 1, 1)
        bad = np.zeros(ntasks, dtype=p.dtype)
        of = out.reshape(-1)
        ea = epi.kernel_arg(of)
        xf = xp.reshape(-1)
        # (weights, bias and geometry keep their types for the layer: only these vary)
        key = (type_key(xf), type_key(of))
        f = _callees(xf, uf, bp, of, zeros, b["m"], nchw)
        _WINOGRAD.run(key + (arg_key(ea), nchw), ntasks, xf, uf, bp, of, bad, zeros, geo, *layout, ea, f)
        if not np.isfinite(bad).all():
            # a non-finite input or weight (or an overflow): the transforms smear it over whole
            # tiles, so the direct kernel computes the layer with torch's propagation instead
            tiled.run(p, x, flipped_weights(w, wlayout, p.groups) if flip else w, bias, out, epi)
    return call


def _run_live(p, x, w, bias, out, m, flip):
    """Padding beyond 2: the outputs whose 3x3 window is all padding are exactly the bias
    (in a tile, the transforms would leave its neighbours' rounding there); the rest is
    the layer with the padding cut to 2, computed aside and copied in."""
    q = dataclasses.replace(p, pad_top=min(p.pad_top, 2), pad_bottom=min(p.pad_bottom, 2),
                            pad_left=min(p.pad_left, 2), pad_right=min(p.pad_right, 2))
    live = np.empty(q.out_shape, dtype=p.dtype)
    run(q, x, w, bias, live, m, flip)
    nchw = p.layout == "NCHW"
    o = out if nchw else out.transpose(0, 3, 1, 2)
    o[...] = 0 if bias is None else bias.reshape(1, -1, 1, 1)
    r0, c0 = p.pad_top - q.pad_top, p.pad_left - q.pad_left
    o[:, :, r0:r0 + q.ho, c0:c0 + q.wo] = live if nchw else live.transpose(0, 3, 1, 2)


def microkernel_asm(dtype=np.float32, part="gemm"):
    """Machine code of a Winograd stage on the compile target, for the codegen tests:
    ``"gemm"`` (:func:`_gemms`: the register block over the transformed tiles; the loop with
    most FMAs is the 8-tile block's, unrolled: its 14-tile one is tiled's, checked there),
    ``"input"``
    (:func:`_in_tiles4`) or ``"output"`` (:func:`_out_tile4`).  Compiled afresh (no cache)."""
    from ._jit import FASTMATH
    fn = {"gemm": _gemms, "input": _in_tiles4, "output": _out_tile4}[part]
    t = numba.from_dtype(np.dtype(dtype))
    a, i = t[::1], numba.int64
    sig = {"gemm": (a, a, a, a, a) + (i,) * 12,
           "input": (a, a, a) + (i,) * 10,
           "output": (a, a, a) + (i,) * 8}[part]
    jitted = numba.njit(cache=False, nogil=True, fastmath=FASTMATH)(fn.py_func)
    jitted.compile(sig)
    return jitted.inspect_asm(sig)
