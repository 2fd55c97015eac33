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

Opt-in measured choice (like ``torch.backends.cudnn.benchmark``): with
``numbaconv.auto.benchmark = True`` (or ``NUMBACONV_AUTOTUNE=1`` in the environment) the
first ``auto`` call for each problem geometry times every candidate on the call's own
arrays -- a warm-up run (compilation, first touch) and then the best of
:data:`BENCHMARK_REPEATS` -- and later calls with the same geometry run the winner
(:data:`measured` holds the choices; :func:`forget_measurements` clears them).
"""

import os
import time

from .registry import usable

__all__ = ["choose", "benchmark", "measured", "forget_measurements", "BENCHMARK_REPEATS"]

#: time the candidates on the first call per problem geometry instead of the heuristic
benchmark = os.environ.get("NUMBACONV_AUTOTUNE", "") not in ("", "0")
#: timed runs per candidate (after one untimed warm-up run)
BENCHMARK_REPEATS = 3
#: ConvProblem -> algorithm name, filled when ``benchmark`` is on
measured = {}


def forget_measurements():
    """Drop every measured choice (the next ``auto`` call per geometry measures again)."""
    measured.clear()


def candidates(p):
    """Host algorithms worth timing for ``p``: ``naive`` only for small problems (it is
    10-100x slower on real layers, and measuring it would cost more than it can save)."""
    names = [name for name in ("im2col", "tiled") if usable(name)]
    if p.flops < 2e7 or not names:
        names.append("naive")
    return names


def choose_measured(p, run_with):
    """The fastest of :func:`candidates` for ``p``, measured once per geometry.

    ``run_with(name)`` runs the convolution with algorithm ``name`` (into the caller's
    output).  The choice is cached in :data:`measured`.
    """
    name = measured.get(p)
    if name is not None:
        return name
    best, best_t = None, float("inf")
    for name in candidates(p):
        run_with(name)  # warm-up: compilation or cache load, first-touch allocations
        t = float("inf")
        for _ in range(BENCHMARK_REPEATS):
            t0 = time.perf_counter()
            run_with(name)
            t = min(t, time.perf_counter() - t0)
        if t < best_t:
            best, best_t = name, t
    measured[p] = best
    return best


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
