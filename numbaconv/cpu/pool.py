"""2-D max pooling, for the converted models of :func:`numbaconv.torch.convert` (not public API).

Why: torch's eager ``max_pool2d`` on an NCHW CPU tensor took 2.8-3.2 ms for ResNet's stem pool
(1x64x112x112, 3x3 stride 2) on Intel Xeon, 2 threads -- 15 % of a converted ResNet-18's
forward, 20x onnxruntime's MaxPool (0.10 ms) and 12x torch's own channels-last kernel.

Semantics are torch's: windows over the input padded with ``-inf`` (a dilated window can
hold padding only: ``-inf``), output sizes with ``ceil_mode`` as torch computes them, and a
window with a NaN gives NaN.  Ties between
``0.0`` and ``-0.0`` may keep the other zero than torch's scan order would (they compare
equal).

NCHW (:func:`_max_nchw`): one job per output row of a channel plane -- the ``kh`` input rows'
elementwise maximum (unit stride: vectors) into a row buffer with ``-inf`` borders, then each
output column's maximum over ``kw`` entries of it.  NHWC (:func:`_max_nhwc`): one job per
output row; every window position is a run of channels (vectors).
"""

import numpy as np

from ._jit import fill_run, jit, scratch
from ._launch import Task
from ._vec import strided_runs, target_vector_bytes

__all__ = ["out_size", "max_pool2d", "max_pool2d_python"]

#: the stride-2 deinterleave of a row into its even and odd columns
_PHASES = strided_runs(target_vector_bytes())


def out_size(size, k, s, p, d, ceil_mode):
    """Output length along one axis, as torch's ``pooling_output_shape``."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def max_pool2d_python(x, kernel, stride, padding, dilation, ceil_mode):
    """The definition as a plain loop nest on NCHW ``x`` (reading and cross-checking)."""
    n_, c_, h_, w_ = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    ho, wo = out_size(h_, kh, sh, ph, dh, ceil_mode), out_size(w_, kw, sw, pw, dw, ceil_mode)
    out = np.full((n_, c_, ho, wo), -np.inf, dtype=x.dtype)
    for n in range(n_):
        for c in range(c_):
            for i in range(ho):
                for j in range(wo):
                    for r in range(kh):
                        for s in range(kw):
                            hi, wi = i * sh - ph + r * dh, j * sw - pw + s * dw
                            if 0 <= hi < h_ and 0 <= wi < w_:
                                v = x[n, c, hi, wi]
                                if v > out[n, c, i, j] or v != v:
                                    out[n, c, i, j] = v
    return out


@jit(inline="always")  # (into the two kernels: one function less to compile)
def _max_run(dst, d0, src, s0, n):
    """``dst[d0 + t] = max(dst[d0 + t], src[s0 + t])`` for ``t < n``, a NaN on either side kept
    (torch's rule; a unit-stride loop LLVM vectorises)."""
    for t in range(n):
        a = src[np.uintp(s0 + t)]
        m = dst[np.uintp(d0 + t)]
        dst[np.uintp(d0 + t)] = a if (a > m or a != a) else m


@jit
def _max_nchw(lo, hi, x, out, kh, kw, sh, sw, ph, pw, dh, dw):
    """Jobs ``[lo, hi)`` over (image x channel, output row)."""
    h_, w_ = x.shape[2], x.shape[3]
    ho_, wo_ = out.shape[2], out.shape[3]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    span = (wo_ - 1) * sw + (kw - 1) * dw + 1  # padded input columns the windows read
    inner = min(w_, span - pw)  # input columns inside that span
    half = (span + 1) // 2
    row = scratch(2 * half, x)
    fill_run(row, 0, 2 * half, -np.inf)  # (the borders stay -inf: only [pw, pw + inner) is written)
    phases = scratch(2 * half, x)
    for job in range(lo, hi):
        plane = job // ho_
        i = job % ho_
        # the window's rows, each max-ed in from -inf (a window of padding rows only: -inf, as torch)
        fill_run(row, pw, inner, -np.inf)
        for r in range(kh):
            hr = i * sh - ph + r * dh
            if 0 <= hr < h_:
                _max_run(row, pw, xf, (plane * h_ + hr) * w_, inner)
        dst = job * wo_
        if sw <= 2:
            # tap s of output column j reads row[j * sw + s * dw]: for stride 2 the row's even
            # and odd columns as two runs (phase p at phases[p * half:]), so every tap is a
            # unit-stride run over j (vectors) instead of a strided gather
            buf = row
            if sw == 2:
                _PHASES(phases, 0, half, row, 0, 2, half)
                buf = phases
            fill_run(of, dst, wo_, -np.inf)
            for s in range(kw):
                off = s * dw
                _max_run(of, dst, buf, (off % sw) * half + off // sw, wo_)
        else:
            for j in range(wo_):
                m = row[np.uintp(j * sw)]
                for s in range(1, kw):
                    a = row[np.uintp(j * sw + s * dw)]
                    if a > m or a != a:
                        m = a
                of[np.uintp(dst + j)] = m


@jit
def _max_nhwc(lo, hi, x, out, kh, kw, sh, sw, ph, pw, dh, dw):
    """Jobs ``[lo, hi)`` over (image, output row); each window position is ``C`` contiguous values."""
    h_, w_, c_ = x.shape[1], x.shape[2], x.shape[3]
    ho_, wo_ = out.shape[1], out.shape[2]
    xf = x.reshape(-1)
    of = out.reshape(-1)
    for job in range(lo, hi):
        n = job // ho_
        i = job % ho_
        for j in range(wo_):
            dst = (job * wo_ + j) * c_
            fill_run(of, dst, c_, -np.inf)  # (a window of padding only stays -inf, as torch)
            for r in range(kh):
                hr = i * sh - ph + r * dh
                if hr < 0 or hr >= h_:
                    continue
                for s in range(kw):
                    wc = j * sw - pw + s * dw
                    if 0 <= wc < w_:
                        _max_run(of, dst, xf, ((n * h_ + hr) * w_ + wc) * c_, c_)


_NCHW = Task(_max_nchw)
_NHWC = Task(_max_nhwc)


def max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, layout):
    """Max pooling of C-contiguous ``x`` (NCHW or NHWC, float32 or float64) into a new array in
    the same layout.  ``kernel`` .. ``dilation`` are ``(h, w)`` pairs the caller validated as
    torch does (positive; padding at most half the kernel) with positive output sizes."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if layout == "NCHW":
        n_, c_, h_, w_ = x.shape
    else:
        n_, h_, w_, c_ = x.shape
    ho, wo = out_size(h_, kh, sh, ph, dh, ceil_mode), out_size(w_, kw, sw, pw, dw, ceil_mode)
    args = (kh, kw, sh, sw, ph, pw, dh, dw)
    if layout == "NCHW":
        out = np.empty((n_, c_, ho, wo), dtype=x.dtype)
        _NCHW(n_ * c_ * ho, x, out, *args)
    else:
        out = np.empty((n_, ho, wo, c_), dtype=x.dtype)
        _NHWC(n_ * ho, x, out, *args)
    return out
