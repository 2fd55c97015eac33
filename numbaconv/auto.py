"""``algorithm="auto"``: pick the fastest algorithm from the problem's geometry.

The heuristic is a pure function of :class:`~numbaconv.problem.ConvProblem`, so tests can
check its choices without timing anything (``tests/test_auto.py``).  The rules come from
``numbaconv bench --algorithms naive,im2col,tiled --budget 0.3`` on the public suite
(float32, 2 threads, a quiet 2-core Zen 4 VM, commit 50d3139).  Milliseconds:

==================  ======  ======  ======  ======  ==========================
problem             layout  naive   im2col  tiled   choice
==================  ======  ======  ======  ======  ==========================
resnet_res2_1x1     NCHW     6.95    0.71    1.06   im2col (1x1, stride 1)
resnet_res2_1x1     NHWC     2.09    0.65    0.90   im2col (1x1, stride 1)
resnet_res3_1x1_s2  NCHW    12.4     0.73    0.60   tiled
resnet_res3_1x1_s2  NHWC     0.82    0.41    0.53   im2col (1x1, NHWC)
resnet_conv1        both    6.8-34  2.9-6.3  1.7    tiled
resnet_res4_3x3     both    4.3-51  2.7-3.0  1.6-1.8 tiled
resnet_res5_3x3     both    4.2-68  5.4-7.3  2.0-2.1 tiled
mobilenet_dw_s1     both    0.35-5.3  1.6-13  0.14-0.20 tiled (depthwise kernel)
mobilenet_dw_14     both    0.35-1.2  1.0-3.7 0.06-0.09 tiled (depthwise kernel)
seed_notebook       both    15-165  51-155  9.0-9.5 tiled (streaming kernel)
==================  ======  ======  ======  ======  ==========================

Why: ``tiled`` (register-blocked direct convolution, with its depthwise and streaming
kernels) wins everywhere a reduction spans several kernel taps.  A 1x1 convolution has
no taps to reuse inputs across: it is a plain GEMM, and when no im2col fill is needed
(stride 1, no padding: the input already is the matrix) or the fill is a cheap
contiguous gather (NHWC), BLAS's packed GEMM beats ``tiled``'s per-block overhead.
``naive`` is never chosen: it is the correctness baseline.
"""

from .registry import usable

__all__ = ["choose"]


def choose(p):
    """Name of the algorithm ``auto`` runs for problem ``p`` (a host algorithm)."""
    pointwise = p.r == p.s == 1 and not p.has_padding and p.dil_h == p.dil_w == 1
    if pointwise and not p.is_depthwise and (p.stride_h == p.stride_w == 1 or p.layout == "NHWC"):
        return "im2col"
    if usable("tiled"):
        return "tiled"
    # without tiled: im2col once each output pixel reduces over enough inputs to amortise
    # its fill; tiny (memory-bound) reductions stay with the direct loop
    if p.cg * p.r * p.s >= 16 and p.kg >= 8:
        return "im2col"
    return "naive"
