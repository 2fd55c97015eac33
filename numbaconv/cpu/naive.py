"""``naive``: the direct loop nest, the correctness baseline.

The plain-Python :func:`conv2d_python` is the seed notebook's loop nest generalised to
the whole contract (stride, padding, dilation, groups, bias); it is kept for reading and
for cross-checking on tiny shapes.  The ``@njit`` kernels are the same arithmetic with
two changes that make them usable: the loop order puts a unit-stride loop innermost
(output width in NCHW, output channels in NHWC) so LLVM vectorises it, and the parallel loop
runs over batch x output channels (NCHW) or batch x output rows (NHWC), so batch 1 keeps
both cores busy.  Zero padding is handled by clipping each tap's loop to the valid range.
"""

import numpy as np

from ._jit import copy_run, fill_run, jit, valid_range
from ._launch import Task

__all__ = ["conv2d_python", "run"]


def conv2d_python(x, w, bias, stride, padding, dilation, groups):
    """Reference loop nest on NCHW ``x`` and OIHW ``w``; ``padding = (top, bottom, left, right)``."""
    n_, c_, h_, w_ = x.shape
    k_, cg, r_, s_ = w.shape
    sh, sw = stride
    top, bottom, left, right = padding
    dh, dw = dilation
    ho_ = (h_ + top + bottom - dh * (r_ - 1) - 1) // sh + 1
    wo_ = (w_ + left + right - dw * (s_ - 1) - 1) // sw + 1
    kg = k_ // groups
    out = np.zeros((n_, k_, ho_, wo_), dtype=x.dtype)
    for n in range(n_):
        for k in range(k_):
            g = k // kg
            for i in range(ho_):
                for j in range(wo_):
                    acc = 0.0 if bias is None else bias[k]
                    for c in range(cg):
                        for r in range(r_):
                            for s in range(s_):
                                hi = i * sh + r * dh - top
                                wi = j * sw + s * dw - left
                                if 0 <= hi < h_ and 0 <= wi < w_:
                                    acc += x[n, g * cg + c, hi, wi] * w[k, c, r, s]
                    out[n, k, i, j] = acc
    return out


# Inner loops index flat views with unsigned ints: Numba adds a negative-index wraparound
# select to every signed index LLVM cannot prove >= 0, and that select blocks vectorisation.
@jit
def _naive_nchw(lo, hi, x, w, bias, out, sh, sw, pt, pl, dh, dw, groups):
    """Jobs ``[lo, hi)`` over (image, output channel)."""
    n_, c_, h_, w_ = x.shape
    k_, cg, r_, s_ = w.shape
    ho_, wo_ = out.shape[2], out.shape[3]
    kg = k_ // groups
    xf = x.ravel()
    of = out.reshape(-1)
    row = np.empty(wo_, dtype=out.dtype)
    for job in range(lo, hi):
        n = job // k_
        k = job % k_
        g = k // kg
        for i in range(ho_):
            fill_run(row, 0, wo_, bias[k])  # (not a slice assignment: see _jit.copy_run)
            for c in range(cg):
                for r in range(r_):
                    hi = i * sh + r * dh - pt
                    if hi < 0 or hi >= h_:
                        continue
                    line = ((n * c_ + g * cg + c) * h_ + hi) * w_
                    for s in range(s_):
                        wv = w[k, c, r, s]
                        off = s * dw - pl
                        lo, hi_j = valid_range(off, sw, w_, wo_)
                        src = line + off
                        for j in range(lo, hi_j):
                            row[np.uintp(j)] += xf[np.uintp(src + j * sw)] * wv
            copy_run(of, ((n * k_ + k) * ho_ + i) * wo_, row, 0, wo_)


@jit
def _naive_nhwc(lo, hi, x, w, bias, out, sh, sw, pt, pl, dh, dw, groups):
    """Jobs ``[lo, hi)`` over (image, output row); ``w`` is HWIO: (R, S, C/groups, K), so the
    innermost loop over output channels is unit-stride."""
    n_, h_, w_, c_ = x.shape
    r_, s_, cg, k_ = w.shape
    ho_, wo_ = out.shape[1], out.shape[2]
    kg = k_ // groups
    wf = w.ravel()
    of = out.reshape(-1)
    acc = np.empty(k_, dtype=out.dtype)
    for job in range(lo, hi):
        n = job // ho_
        i = job % ho_
        for j in range(wo_):
            copy_run(acc, 0, bias, 0, k_)
            for r in range(r_):
                hi = i * sh + r * dh - pt
                if hi < 0 or hi >= h_:
                    continue
                for s in range(s_):
                    wi = j * sw + s * dw - pl
                    if wi < 0 or wi >= w_:
                        continue
                    for g in range(groups):
                        for c in range(cg):
                            xv = x[n, hi, wi, g * cg + c]
                            wrow = ((r * s_ + s) * cg + c) * k_ + g * kg
                            for kk in range(kg):
                                acc[np.uintp(g * kg + kk)] += xv * wf[np.uintp(wrow + kk)]
            copy_run(of, ((n * ho_ + i) * wo_ + j) * k_, acc, 0, k_)


_NAIVE_NCHW = Task(_naive_nchw)
_NAIVE_NHWC = Task(_naive_nhwc)

WEIGHT_LAYOUTS = (("NCHW", "OIHW"), ("NHWC", "HWIO"))


def run(p, x, w, bias, out):
    """``w`` is OIHW for NCHW and HWIO for NHWC (see :data:`WEIGHT_LAYOUTS`)."""
    b = np.zeros(p.k, dtype=p.dtype) if bias is None else bias
    geometry = (p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w, p.groups)
    if p.layout == "NCHW":
        _NAIVE_NCHW(p.n * p.k, x, w, b, out, *geometry)
    else:
        _NAIVE_NHWC(p.n * p.ho, x, w, b, out, *geometry)
