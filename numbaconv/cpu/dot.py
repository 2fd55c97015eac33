"""``tiled``'s path for deep NCHW layers: few output pixels, large OIHW weights read in place.

ResNet's res5 3x3 (7x7 pixels, 512 -> 512 channels) uses each of its 9.4 MB of weights for
only 49 output pixels.  The register-blocked micro-kernel of :mod:`numbaconv.cpu.tiled` wants
the weights packed ``V`` output channels at a time; packing them per call, or checking a
cached packed copy bit for bit (which reads 2 x 9.4 MB), costs a third of the arithmetic.
So ``conv2d`` runs them here; a :class:`numbaconv.Conv2dPlan` packs its weights once and runs
the packed blocks, faster on Zen 3 (``tiled.bind(prepared=True)``).

Here nothing is packed: an OIHW weight row ``w[k]`` (``C*R*S`` values, in ``(c, r, s)``
order) is already a contiguous reduction vector, so the convolution is the dot products

    out[n, k, p] = w[k, :] . cols[n*Ho*Wo + p, :]

with ``cols`` the per-pixel im2col rows in the same ``(c, r, s)`` order (a bounded
workspace: used only while it stays under :data:`MAX_COLS_BYTES`, i.e. for small images).
The micro-kernel keeps ``KB`` output channels x ``PB`` pixels in vector accumulators of
partial sums along the reduction (explicit LLVM vectors, :func:`numbaconv.cpu._vec.dot_block`,
added across lanes once at the end): on AVX-512 5 x 5 (per step 10 loads feed 25 FMAs,
25 + 5 + 1 of the 32 zmm registers), on AVX2 3 x 4 (16 ymm).  The parallel loop runs over blocks
of ``KB`` output channels.
"""

import numba
import numpy as np

from ._jit import copy_run, jit, zero_run
from ._launch import Task
from ._vec import dot_block, target_vector_bytes
from .epilogue import NONE, finish_2d

__all__ = ["applies", "run", "microkernel_asm", "ENABLED", "KB", "PB", "MAX_COLS_BYTES"]

#: output channels x pixels per block: 25 vector accumulators on AVX-512 (+ 5 weight rows +
#: 1 pixel row of 32 registers; 5 x 5 measured 4-6 % faster than 6 x 4 and 8 x 3 on res5,
#: and pads 49 pixels to 50); 12 on AVX2 / SSE (16 registers: 5 x 5 spilled 16 pairs there)
KB, PB = (5, 5) if target_vector_bytes() >= 64 else (3, 4)
_block = dot_block(KB, PB, target_vector_bytes())
_row = dot_block(1, PB, target_vector_bytes())  # the K % KB channels left over
#: the im2col rows' size limit (the classic im2col blow-up stays bounded)
MAX_COLS_BYTES = 4 << 20
#: at most this many output pixels (all images): beyond it every weight is reused enough
#: for the packed blocks of the ``tiled`` micro-kernel to pay off
MAX_PIXELS = 128
#: and only weights at least this large (smaller ones pack cheaply)
MIN_WEIGHT_BYTES = 1 << 20


#: on AVX2 targets only: with AVX-512 ``tiled``'s packed register blocks run these layers faster
#: even with the per-call check of the packed copy (res5 NCHW: Intel Xeon 1.6-1.7 ms here,
#: 0.97 ms through a ``Conv2dPlan``'s packed weights, ~1.4 through ``conv2d``; Zen 4 1.52 ms
#: here, 1.38 in NHWC); on Zen 1 this kernel was the faster (4.15 against 5.56 ms)
ENABLED = target_vector_bytes() < 64


def applies(p):
    """Deep dense NCHW layer whose packed weights would cost more than they save."""
    pixels = p.n * p.ho * p.wo
    reduction = p.c * p.r * p.s
    item = np.dtype(p.dtype).itemsize
    return (ENABLED and p.layout == "NCHW" and p.groups == 1 and pixels <= MAX_PIXELS
            and p.k * reduction * item >= MIN_WEIGHT_BYTES
            and (pixels + PB) * reduction * item <= MAX_COLS_BYTES)


@jit
def _pad_planes(lo, hi, x, xp, pt, pl):
    """Planes ``[lo, hi)`` (over ``n * C``): ``xp[n, c] =`` plane ``x[n, c]`` inside a zero
    border (``pt`` rows above, ``pl`` columns to the left, the rest below / to the right).
    (copy_run: see :func:`numbaconv.cpu._jit.copy_run`.)"""
    h_, w_ = x.shape[2], x.shape[3]
    hp, wp = xp.shape[2], xp.shape[3]
    xf = x.reshape(-1)
    of = xp.reshape(-1)
    for q in range(lo, hi):
        base = q * hp * wp
        zero_run(of, base, hp * wp)
        for i in range(h_):
            copy_run(of, base + (pt + i) * wp + pl, xf, (q * h_ + i) * w_, w_)


@jit
def _fill_cols(lo, hi, xp, cols, taps, sh, sw, ho_, wo_):
    """Rows ``[lo, hi)`` of ``cols[n*Ho*Wo + i*Wo + j, c*R*S + t] = xp[n, c].flat[i*sh*Wp +
    j*sw + taps[t]]``: every tap of pixel (i, j) at its flat offset ``taps[t] = r*dh*Wp +
    s*dw`` in the padded plane (no bounds tests in the loop); rows past the last pixel are
    zero (the last block's pad)."""
    n_, c_, hp, wp = xp.shape
    hw = ho_ * wo_
    rs = taps.size
    plane = np.uintp(hp * wp)
    xf = xp.reshape(-1)
    for row in range(lo, hi):
        dst = cols[row]
        if row >= n_ * hw:
            zero_run(dst, 0, dst.size)
            continue
        n = row // hw
        i = (row % hw) // wo_
        j = row % wo_
        src = np.uintp(n * c_ * hp * wp + i * sh * wp + j * sw)
        d = np.uintp(0)
        if rs == 9:  # 3x3: the offsets in registers, the 9 copies unrolled (~15 % faster)
            t0, t1, t2, t3, t4, t5, t6, t7, t8 = (taps[0], taps[1], taps[2], taps[3], taps[4], taps[5],
                                                  taps[6], taps[7], taps[8])
            for c in range(np.uintp(c_)):
                dst[d] = xf[src + t0]
                dst[d + 1] = xf[src + t1]
                dst[d + 2] = xf[src + t2]
                dst[d + 3] = xf[src + t3]
                dst[d + 4] = xf[src + t4]
                dst[d + 5] = xf[src + t5]
                dst[d + 6] = xf[src + t6]
                dst[d + 7] = xf[src + t7]
                dst[d + 8] = xf[src + t8]
                src += plane
                d += np.uintp(9)
            continue
        for c in range(np.uintp(c_)):
            for t in range(np.uintp(rs)):
                dst[d + t] = xf[src + taps[t]]
            src += plane
            d += np.uintp(rs)


@jit
def _dot_conv(lo, hi, wm, cols, bias, out, pixels, epi):
    """Blocks ``[lo, hi)`` of KB channels of ``out[n, k, p] = bias[k] + wm[k] .
    cols[n*HoWo + p]``, each block's rows then through the epilogue ``epi`` (None: pruned;
    see ``epilogue.finish_2d``)."""
    k_, red = wm.shape
    hw = out.shape[2] * out.shape[3]
    of = out.reshape(-1)
    wf = wm.reshape(-1)
    cf = cols.reshape(-1)
    acc = np.empty(KB * PB, dtype=out.dtype)
    for kb in range(lo, hi):
        k0 = kb * KB
        kn = min(KB, k_ - k0)
        for p0 in range(0, pixels, PB):
            if kn == KB:
                _block(wf, cf, acc, k0 * red, p0 * red, red, red, red)
            else:
                for a in range(kn):
                    _row(wf, cf, acc[a * PB:], (k0 + a) * red, p0 * red, red, red, red)
            for b in range(min(PB, pixels - p0)):
                n = (p0 + b) // hw
                q = (p0 + b) % hw
                for a in range(kn):
                    of[(n * k_ + k0 + a) * hw + q] = acc[a * PB + b] + bias[k0 + a]
        for n in range(pixels // hw):
            if epi is not None:  # (pruned at compile time without an epilogue)
                finish_2d(of, epi, (n * k_ + k0) * hw, kn, hw, hw)


_PAD = Task(_pad_planes)
_FILL = Task(_fill_cols)
_CONV = Task(_dot_conv)


def microkernel_asm(dtype=np.float32):
    """Machine code of the ``KB x PB`` block for ``dtype`` on the compile target, compiled
    afresh (Numba cannot inspect code loaded from its cache)."""
    def kernel(wf, cf, acc, wb, cb, n):
        _block(wf, cf, acc, wb, cb, n, n, n)

    uk = numba.njit(cache=False, nogil=True)(kernel)
    t = numba.from_dtype(np.dtype(dtype))
    sig = (t[::1], t[::1], t[::1], numba.intp, numba.intp, numba.intp)
    uk.compile(sig)
    return uk.inspect_asm(sig)


def run(p, x, w, bias, out, epi=NONE):
    """``w`` OIHW, C-contiguous; ``x`` NCHW; zero padding only (see :func:`applies`); ``epi``
    fused (:mod:`numbaconv.cpu.epilogue`)."""
    pixels = p.n * p.ho * p.wo
    hp, wp = p.h + p.pad_top + p.pad_bottom, p.w + p.pad_left + p.pad_right
    xp = np.empty((p.n, p.c, hp, wp), dtype=p.dtype)
    taps = np.array([r * p.dil_h * wp + s * p.dil_w for r in range(p.r) for s in range(p.s)], dtype=np.uintp)
    cols = np.empty((-(-pixels // PB) * PB, p.c * p.r * p.s), dtype=p.dtype)
    b = np.zeros(p.k, dtype=p.dtype) if bias is None else bias
    # padded planes, then the columns, then the products, each step's parts in parallel
    _PAD(p.n * p.c, x, xp, p.pad_top, p.pad_left)
    _FILL(cols.shape[0], xp, cols, taps, p.stride_h, p.stride_w, p.ho, p.wo)
    _CONV(-(-p.k // KB), np.ascontiguousarray(w).reshape(p.k, -1), cols, b, out, pixels,
          epi.kernel_arg(out.reshape(-1)))
