"""``tiled``'s path for deep NCHW layers: few output pixels, large OIHW weights read in place.

ResNet's res5 3x3 (7x7 pixels, 512 -> 512 channels) uses each of its 9.4 MB of weights for
only 49 output pixels.  The register-blocked micro-kernel of :mod:`numbaconv.cpu.tiled` wants
the weights packed ``V`` output channels at a time; packing them per call, or checking a
cached packed copy bit for bit (which reads 2 x 9.4 MB), costs a third of the arithmetic.

Here nothing is packed: an OIHW weight row ``w[k]`` (``C*R*S`` values, in ``(c, r, s)``
order) is already a contiguous reduction vector, so the convolution is the dot products

    out[n, k, p] = w[k, :] . cols[n*Ho*Wo + p, :]

with ``cols`` the per-pixel im2col rows in the same ``(c, r, s)`` order (a bounded
workspace: used only while it stays under :data:`MAX_COLS_BYTES`, i.e. for small images).
The micro-kernel keeps 5 output channels x 5 pixels in 25 accumulators and is vectorised
along the reduction by LLVM's loop vectoriser (``reassoc`` lets each accumulator become a
vector of partial sums, added across lanes once at the end): per vector step 10 loads
feed 25 FMAs, 25 + 5 + 1 of the 32 zmm registers.  ``prange`` runs over blocks of 5
output channels.
"""

import numba
import numpy as np
from numba import prange

from ._jit import FASTMATH, jit, pjit

__all__ = ["applies", "run", "microkernel_asm", "KB", "PB", "MAX_COLS_BYTES"]

KB = 5  # output channels per micro-kernel call (the block of _dot5x5)
PB = 5  # output pixels per micro-kernel call (the block of _dot5x5 / _dot1x5)
#: the im2col rows' size limit (the classic im2col blow-up stays bounded)
MAX_COLS_BYTES = 4 << 20
#: at most this many output pixels (all images): beyond it every weight is reused enough
#: for the packed blocks of the ``tiled`` micro-kernel to pay off
MAX_PIXELS = 128
#: and only weights at least this large (smaller ones pack cheaply)
MIN_WEIGHT_BYTES = 1 << 20


def applies(p):
    """Deep dense NCHW layer whose packed weights would cost more than they save."""
    pixels = p.n * p.ho * p.wo
    reduction = p.c * p.r * p.s
    item = np.dtype(p.dtype).itemsize
    return (p.layout == "NCHW" and p.groups == 1 and pixels <= MAX_PIXELS
            and p.k * reduction * item >= MIN_WEIGHT_BYTES
            and (pixels + PB) * reduction * item <= MAX_COLS_BYTES)


@pjit
def _pad_planes(x, xp, pt, pl):
    """``xp[n, c] =`` plane ``x[n, c]`` inside a zero border (``pt`` rows above, ``pl`` columns
    to the left, the rest below / to the right)."""
    n_, c_, h_, w_ = x.shape
    for q in prange(n_ * c_):
        n = q // c_
        c = q % c_
        xp[n, c] = 0
        xp[n, c, pt:pt + h_, pl:pl + w_] = x[n, c]


@pjit
def _fill_cols(xp, cols, taps, sh, sw, ho_, wo_):
    """``cols[n*Ho*Wo + i*Wo + j, c*R*S + t] = xp[n, c].flat[i*sh*Wp + j*sw + taps[t]]``: every
    tap of pixel (i, j) at its flat offset ``taps[t] = r*dh*Wp + s*dw`` in the padded plane
    (no bounds tests in the loop); rows past the last pixel are zero (the last block's pad)."""
    n_, c_, hp, wp = xp.shape
    hw = ho_ * wo_
    rs = taps.size
    plane = np.uintp(hp * wp)
    xf = xp.reshape(-1)
    for row in prange(cols.shape[0]):
        dst = cols[row]
        if row >= n_ * hw:
            dst[:] = 0
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
def _dot5x5(wm, cols, acc, k0, p0, zero):
    """``acc[a, b] = wm[k0 + a] . cols[p0 + b]`` for a, b < 5 (zero-based loop over whole
    rows: no wraparound checks, so it vectorises).  5 x 5 measured 4-6 % faster than 6 x 4
    and 8 x 3 on res5, and pads 49 pixels to 50, not 52."""
    w0, w1, w2, w3, w4 = wm[k0], wm[k0 + 1], wm[k0 + 2], wm[k0 + 3], wm[k0 + 4]
    x0, x1, x2, x3, x4 = cols[p0], cols[p0 + 1], cols[p0 + 2], cols[p0 + 3], cols[p0 + 4]
    a00 = a01 = a02 = a03 = a04 = a10 = a11 = a12 = a13 = a14 = a20 = a21 = a22 = a23 = a24 = zero
    a30 = a31 = a32 = a33 = a34 = a40 = a41 = a42 = a43 = a44 = zero
    for j in range(wm.shape[1]):
        v0, v1, v2, v3, v4 = x0[j], x1[j], x2[j], x3[j], x4[j]
        u = w0[j]
        a00 += u * v0; a01 += u * v1; a02 += u * v2; a03 += u * v3; a04 += u * v4  # noqa: E702
        u = w1[j]
        a10 += u * v0; a11 += u * v1; a12 += u * v2; a13 += u * v3; a14 += u * v4  # noqa: E702
        u = w2[j]
        a20 += u * v0; a21 += u * v1; a22 += u * v2; a23 += u * v3; a24 += u * v4  # noqa: E702
        u = w3[j]
        a30 += u * v0; a31 += u * v1; a32 += u * v2; a33 += u * v3; a34 += u * v4  # noqa: E702
        u = w4[j]
        a40 += u * v0; a41 += u * v1; a42 += u * v2; a43 += u * v3; a44 += u * v4  # noqa: E702
    acc[0, 0], acc[0, 1], acc[0, 2], acc[0, 3], acc[0, 4] = a00, a01, a02, a03, a04
    acc[1, 0], acc[1, 1], acc[1, 2], acc[1, 3], acc[1, 4] = a10, a11, a12, a13, a14
    acc[2, 0], acc[2, 1], acc[2, 2], acc[2, 3], acc[2, 4] = a20, a21, a22, a23, a24
    acc[3, 0], acc[3, 1], acc[3, 2], acc[3, 3], acc[3, 4] = a30, a31, a32, a33, a34
    acc[4, 0], acc[4, 1], acc[4, 2], acc[4, 3], acc[4, 4] = a40, a41, a42, a43, a44


@jit
def _dot1x5(w0, cols, acc, p0, zero):
    """One output channel's 5 pixels (the ``K % 5`` channels left over)."""
    x0, x1, x2, x3, x4 = cols[p0], cols[p0 + 1], cols[p0 + 2], cols[p0 + 3], cols[p0 + 4]
    a0 = a1 = a2 = a3 = a4 = zero
    for j in range(w0.shape[0]):
        u = w0[j]
        a0 += u * x0[j]; a1 += u * x1[j]; a2 += u * x2[j]; a3 += u * x3[j]; a4 += u * x4[j]  # noqa: E702
    acc[0, 0], acc[0, 1], acc[0, 2], acc[0, 3], acc[0, 4] = a0, a1, a2, a3, a4


@pjit
def _dot_conv(wm, cols, bias, out, pixels, zero):
    """``out[n, k, p] = bias[k] + wm[k] . cols[n*HoWo + p]`` over blocks of KB channels."""
    k_ = wm.shape[0]
    hw = out.shape[2] * out.shape[3]
    of = out.reshape(-1)
    nkb = (k_ + KB - 1) // KB
    for kb in prange(nkb):
        acc = np.empty((KB, PB), dtype=out.dtype)
        k0 = kb * KB
        kn = min(KB, k_ - k0)
        for p0 in range(0, pixels, PB):
            if kn == KB:
                _dot5x5(wm, cols, acc, k0, p0, zero)
            else:
                for a in range(kn):
                    _dot1x5(wm[k0 + a], cols, acc[a:], p0, zero)
            for b in range(min(PB, pixels - p0)):
                n = (p0 + b) // hw
                q = (p0 + b) % hw
                for a in range(kn):
                    of[(n * k_ + k0 + a) * hw + q] = acc[a, b] + bias[k0 + a]


def microkernel_asm(dtype=np.float32):
    """Machine code of :func:`_dot5x5` for ``dtype``, compiled afresh (Numba cannot inspect
    code loaded from its cache)."""
    uk = numba.njit(cache=False, nogil=True, fastmath=FASTMATH)(_dot5x5.py_func)
    t = numba.from_dtype(np.dtype(dtype))
    sig = (t[:, ::1], t[:, ::1], t[:, ::1], numba.intp, numba.intp, t)
    uk.compile(sig)
    return uk.inspect_asm(sig)


def run(p, x, w, bias, out):
    """``w`` OIHW, C-contiguous; ``x`` NCHW; zero padding only (see :func:`applies`)."""
    pixels = p.n * p.ho * p.wo
    hp, wp = p.h + p.pad_top + p.pad_bottom, p.w + p.pad_left + p.pad_right
    xp = np.empty((p.n, p.c, hp, wp), dtype=p.dtype)
    _pad_planes(x, xp, p.pad_top, p.pad_left)
    taps = np.array([r * p.dil_h * wp + s * p.dil_w for r in range(p.r) for s in range(p.s)], dtype=np.uintp)
    cols = np.empty((-(-pixels // PB) * PB, p.c * p.r * p.s), dtype=p.dtype)
    _fill_cols(xp, cols, taps, p.stride_h, p.stride_w, p.ho, p.wo)
    b = np.zeros(p.k, dtype=p.dtype) if bias is None else bias
    _dot_conv(np.ascontiguousarray(w).reshape(p.k, -1), cols, b, out, pixels, p.dtype.type(0))
