"""``algorithm="auto"``: pick the fastest algorithm from the problem's geometry.

The heuristic is a pure function of :class:`~numbaconv.problem.ConvProblem`, so tests can
check its choices without timing anything (``tests/test_auto.py``).  The rules come from
timing ``tiled``, ``im2col`` and ``naive`` on the public suite (float32, 2-core Zen 4,
one thread each, CPU time, best of 10; ``/tmp/tiled_lab/bench.py`` in the issue-3 notes):

============================  ======  =========  ==========  =========  =========
problem                       layout  tiled ms   im2col ms   naive ms   choice
============================  ======  =========  ==========  =========  =========
seed_notebook (C=K=3)         NCHW        26.8       158.7       25.4   tiled [1]
seed_notebook (C=K=3)         NHWC        36.3       607.3      285.8   tiled [1]
resnet_conv1 (7x7 s2, C=3)    both      3.0-3.1    7.2-14.7         -   tiled
resnet_res2_3x3               both      2.7-2.9    3.0-6.2          -   tiled
resnet_res2_1x1               NCHW         2.14        1.59         -   im2col
resnet_res2_1x1               NHWC         1.86        1.27         -   im2col
resnet_res3_1x1_s2            NCHW         2.19        1.77         -   im2col
resnet_res3_1x1_s2            NHWC         1.00        0.76         -   im2col
resnet_res4_3x3               NCHW         3.45        2.99         -   im2col
resnet_res4_3x3               NHWC         3.97        8.10         -   tiled
resnet_res5_3x3               NCHW         6.44        2.76         -   im2col
resnet_res5_3x3               NHWC        16.8        30.4          -   tiled
vgg_3x3, batch8_3x3           both      18.9-19.8  25.8-132         -   tiled
mobilenet_dw_* (depthwise)    NCHW      0.71-1.46  1.5-2.6    0.57-0.94  naive
mobilenet_dw_* (depthwise)    NHWC      0.16-0.55  6.1-21.8   2.4-11.2   tiled
============================  ======  =========  ==========  =========  =========

[1] ``tiled`` hands few-channel problems to its streaming kernel (``uses_streaming``).

Why: ``tiled`` spends a transpose of the weights into its packed layout on every call;
that is negligible while the weights are small next to the image (ResNet's early layers,
VGG, batches) but dominates once they outweigh it by ~100x (res4/res5 in NCHW, where
im2col's GEMM reads OIHW weights as they are).  In NHWC the front door hands every
algorithm OIHW weights, so im2col transposes them too and ``tiled`` stays ahead.  1x1
convolutions are plain GEMMs: im2col's fill is a copy and BLAS wins.  Depthwise NCHW
planes are best served by the simple width-vectorised ``naive`` loop.
"""

from .registry import algorithms

__all__ = ["choose", "WEIGHT_HEAVY"]

#: weights per output pixel above which im2col's BLAS GEMM beats tiled's packing (NCHW)
WEIGHT_HEAVY = 100


def choose(p):
    """Name of the algorithm ``auto`` runs for problem ``p``."""
    names = algorithms()
    if "tiled" not in names:
        # im2col pays a fill of C*R*S*Ho*Wo values per GEMM; it wins once each output pixel
        # reduces over enough inputs to amortise it.  Tiny reductions are memory-bound.
        if p.cg * p.r * p.s >= 16 and p.kg >= 8:
            return "im2col"
        return "naive"
    if p.is_depthwise:
        return "naive" if p.layout == "NCHW" and "naive" in names else "tiled"
    if "im2col" in names and p.groups == 1:
        if p.r == 1 and p.s == 1 and p.dil_h == 1 and p.dil_w == 1 and p.c >= 32 and p.k >= 32:
            return "im2col"
        weights = p.k * p.cg * p.r * p.s
        pixels = max(1, p.n * p.ho * p.wo)
        if p.layout == "NCHW" and weights >= WEIGHT_HEAVY * pixels and p.c >= 32:
            return "im2col"
    return "tiled"
