"""``algorithm="auto"``: pick the fastest algorithm from the problem's geometry.

The heuristic is a pure function of :class:`~numbaconv.problem.ConvProblem`, so tests can
check its choices without timing anything (``tests/test_auto.py``).  The rules come from
timing the algorithms on the public suite, float32, 2 threads for numbaconv and torch,
wall clock, median of 10 (2-core Zen 4 VM; ``/tmp/tiled_lab/bench.py`` in the issue-3
notes).  Milliseconds:

============================  ======  ======  ======  ======  =========
problem                       layout  tiled   im2col  naive   choice
============================  ======  ======  ======  ======  =========
seed_notebook (C=K=3)         NCHW     14.9        -   ~25*   tiled [1]
seed_notebook (C=K=3)         NHWC     20.4        -  ~285*   tiled [1]
resnet_conv1                  both    1.5-1.8      -       -  tiled
resnet_res2_3x3               both      1.3        -       -  tiled
resnet_res2_1x1               NCHW     0.95      8.0       -  tiled
resnet_res3_1x1_s2            both    0.5-0.8    8.0       -  tiled
resnet_res4_3x3               NCHW     1.88      8.0       -  tiled
resnet_res5_3x3               NCHW     7.2       8.0       -  tiled
vgg_3x3, batch8_3x3           both    9.4-10.8     -       -  tiled
mobilenet_dw_s1               NCHW     0.38        -    0.31  naive
mobilenet_dw_s2               NCHW     0.62        -    0.51  naive
mobilenet_dw_14               NCHW     0.51        -    0.42  naive
mobilenet_dw_* (depthwise)    NHWC    0.11-0.34    -   (1 thread: 5-20x slower)  tiled
============================  ======  ======  ======  ======  =========

``*`` one thread, CPU time.  [1] ``tiled`` hands few-channel problems to its streaming
kernel (``tiled.uses_streaming``).

Why: ``tiled`` is the fastest everywhere but on depthwise NCHW planes, where the plain
width-vectorised ``naive`` loop has less per-call overhead than ``tiled``'s depthwise
kernel.  On one thread (CPU time) im2col's BLAS GEMM did beat ``tiled`` on 1x1 layers and
on res4/res5 in NCHW (``tiled`` transposes its weights into the packed layout on every
call, which dominates when the weights outweigh the image ~100x), but with 2 threads the
im2col path measured ~8 ms on every one of those layers (BLAS threads competing with
Numba's), so ``auto`` does not pick it.
"""

from .registry import algorithms

__all__ = ["choose"]


def choose(p):
    """Name of the algorithm ``auto`` runs for problem ``p``."""
    names = algorithms()
    if "tiled" not in names:
        # im2col pays a fill of C*R*S*Ho*Wo values per GEMM; it wins once each output pixel
        # reduces over enough inputs to amortise it.  Tiny reductions are memory-bound.
        if p.cg * p.r * p.s >= 16 and p.kg >= 8:
            return "im2col"
        return "naive"
    if p.is_depthwise and p.layout == "NCHW" and "naive" in names:
        return "naive"
    return "tiled"
