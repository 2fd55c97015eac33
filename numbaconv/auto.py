"""``algorithm="auto"``: pick the fastest algorithm from the problem's geometry.

The heuristic is a pure function of :class:`~numbaconv.problem.ConvProblem`, so tests can
check its choices without timing anything (``tests/test_auto.py``).  The rules come from
``numbaconv bench --budget 0.4`` on the public suite (float32, 2 threads, a quiet 2-core
Zen 4 VM, commit 967257f).  Milliseconds:

==================  ======  ======  ======  ======  ==========================
problem             layout  naive   im2col  tiled   choice
==================  ======  ======  ======  ======  ==========================
resnet_res2_1x1     NCHW     4.48    0.58    0.76   im2col (1x1, stride 1)
resnet_res2_1x1     NHWC     1.20    0.54    0.66   im2col (1x1, stride 1)
resnet_res3_1x1_s2  NCHW     8.90    0.37    0.39   tiled (within 5 %)
resnet_res3_1x1_s2  NHWC     0.76    0.31    0.31   im2col (1x1, NHWC)
resnet_conv1        both    5.4-23  1.7-3.8 1.35-1.38 tiled
resnet_res2_3x3     both    4.5-11  1.6-1.7 1.16-1.24 tiled
resnet_res4_3x3     both    3.0-36  1.4-1.5 1.16-1.17 tiled
resnet_res5_3x3     both    3.2-57  2.3-3.8 1.57-1.68 tiled
vgg_3x3 / batch8    both    24-94   11-15   9.5-9.9 tiled
mobilenet_dw_s1     both    0.25-5.3 0.38-13 0.10-0.11 tiled (depthwise kernel)
mobilenet_dw_14     both    0.34-2.0 0.58-5.0 0.06-0.12 tiled (depthwise kernel)
seed_notebook       both    14-142  27-121  7.0-8.2 tiled (streaming kernel)
==================  ======  ======  ======  ======  ==========================

Why: ``tiled`` (register-blocked direct convolution, with its depthwise and streaming
kernels) wins everywhere a reduction spans several kernel taps.  A 1x1 convolution has
no taps to reuse inputs across: it is a plain GEMM, and when no im2col fill is needed
(stride 1, no padding: the input already is the matrix) or the fill is a cheap
contiguous gather (NHWC), BLAS's packed GEMM beats ``tiled``'s per-block overhead --
unless the GEMM is thin.  ``im2col`` splits the pixels between the threads, so an NHWC
batch of 7x7 images leaves each thread's GEMM ~25 columns; ``tiled`` splits the output
channels instead.  MobileNetV2's and ResNet-50's 1x1 layers, stride 1, batch 1,
``Conv2dPlan``, AMD EPYC Zen 1, 2 threads, best of 4 interleaved rounds (ms):

==================  ======  ======  ======  ============================================
layer (C->K @ HW)   layout  im2col  tiled   choice
==================  ======  ======  ======  ============================================
960->320 @ 7        NHWC    0.74    0.50    tiled (N*Ho*Wo < 128)
320->1280 @ 7       NHWC    1.41    0.69    tiled
2048->512 @ 7       NHWC    2.46    1.65    tiled
160->960 @ 7        NHWC    0.38    0.30    tiled
576->96 @ 14        NHWC    0.37    0.38    im2col
320->1280 @ 7       NCHW    0.72    0.85    (then) im2col; now tiled's in-place GEMM, below
144->24 @ 56        NCHW    0.86    0.63    (then) im2col; now tiled's in-place GEMM, below
==================  ======  ======  ======  ============================================

Tenth session: NCHW stride-1 1x1 layers run in ``tiled`` as a GEMM on the input in place
(:mod:`numbaconv.cpu.pointwise`; the ``tiled`` column above was its NHWC copy and transposed
stores): MobileNetV2's and ResNet-50's such layers at 47-65 GFLOP/s against BLAS's 28-60
(2 threads, same process; 144->24 @ 56 0.80 -> 0.39 ms, 32->16 @ 112 0.46 -> 0.25 ms,
ResNet-50's 64->256 @ 56 3.2 -> 2.1 ms; 7x7 images 0.87-1.15x), at batch 1 and 8.

Converted whole models (``numbaconv.torch.convert``, eval, batch 1, same machine, interleaved):
channels_last MobileNetV2 24.4 -> 23.6 ms and ResNet-50 134.5 -> 127.8 ms with the 7x7 rule.
NCHW layers reducing many channels to <= 64 over a large image (144->24 @ 56, 256->64 @ 56)
also ran 1.2-1.4x faster in ``tiled`` alone, but sending them there moved neither model
(+-1 %, within the noise), so they stay with BLAS.

``naive`` is never chosen: it is the correctness baseline.

Winograd (measured after the table, same machine): every stride-1 3x3 layer of the suite
runs 1.7-2.6x faster in ``winograd`` than in ``tiled`` (res5's 7x7 outputs: 1.1-1.4x, in
F(2x2)), and so does any such layer with at least 16 input channels per group and enough
output tiles (:func:`numbaconv.cpu.winograd.profitable`); with fewer channels (RGB
inputs, 8-channel layers) the GEMMs are too short to repay the transforms (0.65-1.0x),
with a handful of tiles they only stream the transformed weights.  ``auto`` picks it
there unless turned off: ``numbaconv.auto.winograd = False`` or ``NUMBACONV_WINOGRAD=0``
in the environment, for users who want the direct kernels' rounding (Winograd's float32 error is a few times larger, within SPEC's bound).

Opt-in measured choice (like ``torch.backends.cudnn.benchmark``): with
``numbaconv.auto.benchmark = True`` (or ``NUMBACONV_AUTOTUNE=1`` in the environment) the
first ``auto`` call for each problem geometry times every candidate on the call's own
arrays -- a warm-up run (compilation, first touch) and then the best of
:data:`BENCHMARK_REPEATS` -- and later calls with the same geometry run the winner
(:data:`measured` holds the choices; :func:`forget_measurements` clears them).
"""

import os
import time

from . import tuning
from .registry import REGISTRY, usable

__all__ = ["choose", "heuristic", "candidates", "benchmark", "winograd", "measured", "forget_measurements", "BENCHMARK_REPEATS"]

#: time the candidates on the first call per problem geometry instead of the heuristic
benchmark = os.environ.get("NUMBACONV_AUTOTUNE", "") not in ("", "0")
#: let ``auto`` run stride-1 3x3 layers with Winograd (``NUMBACONV_WINOGRAD=0``: never)
winograd = os.environ.get("NUMBACONV_WINOGRAD", "1") not in ("0", "false", "False", "no", "off")
#: timed runs per candidate (after one untimed warm-up run)
BENCHMARK_REPEATS = 3
#: pixels per image from which NCHW 1x1 layers run on tiled's in-place GEMM: 7x7 images too
#: (49 pixels: 3 whole blocks of 16 and one of 1; BLAS runs them 0.97-1.15x as fast, but a
#: model would compile im2col's task function as well: MobileNetV2's first forward, Zen 1)
MIN_NCHW_GEMM_PIXELS = 32
#: ConvProblem -> algorithm name, filled when ``benchmark`` is on
measured = {}


def forget_measurements():
    """Drop every measured choice (the next ``auto`` call per geometry measures again)."""
    measured.clear()


def candidates(p):
    """Host algorithms worth timing for ``p``: ``naive`` only for small problems (it is
    10-100x slower on real layers, and measuring it would cost more than it can save)."""
    names = [name for name in ("im2col", "tiled") if usable(name)]
    if winograd and usable("winograd") and _winograd_applies(p):
        names.append("winograd")
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


#: (problem, prepared, winograd, tuning generation, usable) -> :func:`choose`'s answer: the rules
#: cost ~10 us of Python per ``conv2d`` call (a fifth of a small layer's front door)
_CHOICES = {}


def choose(p, prepared=False):
    """Name of the algorithm ``auto`` runs for problem ``p`` (a host algorithm): the one
    ``numbaconv tune`` measured fastest for exactly this geometry on this CPU (for a
    :class:`numbaconv.Conv2dPlan`'s prepared weights: ``prepared``), if any
    (:mod:`numbaconv.tuning`), else the heuristic's.  Remembered per problem while the
    switches and knobs it reads stay as they are."""
    key = (p, prepared, winograd, tuning.generation(), usable)
    name = _CHOICES.get(key)
    if name is None:
        name = _choose(p, prepared)
        if len(_CHOICES) >= 4096:
            _CHOICES.clear()
        _CHOICES[key] = name
    return name


def _choose(p, prepared):
    tuned = tuning.choice(p, prepared)
    if tuned is not None and tuned in candidates(p):
        return tuned
    return heuristic(p)


def heuristic(p):
    """The algorithm the rules above pick for ``p`` (no tuning consulted)."""
    pointwise = p.r == p.s == 1 and not p.has_padding and p.dil_h == p.dil_w == 1
    if pointwise and not p.is_depthwise and (p.stride_h == p.stride_w == 1 or p.layout == "NHWC"):
        return ("tiled" if (_gemm_too_thin(p) or _nchw_gemm(p) or _nhwc_gemm_in_tiled(p)) and usable("tiled")
                else "im2col")
    if winograd and usable("winograd") and REGISTRY["winograd"].impl.profitable(p):
        return "winograd"
    if usable("tiled"):
        return "tiled"
    # without tiled: im2col once each output pixel reduces over enough inputs to amortise
    # its fill; tiny (memory-bound) reductions stay with the direct loop
    if p.cg * p.r * p.s >= 16 and p.kg >= 8:
        return "im2col"
    return "naive"


def _gemm_too_thin(p):
    """A 1x1 layer whose GEMM is too thin for BLAS (the table above): NHWC with fewer than
    128 output pixels in the batch, ~25 columns per thread's GEMM on 7x7 images (``tiled``,
    splitting output channels, ran MobileNetV2's and ResNet-50's 1.2-2.1x faster)."""
    return p.layout == "NHWC" and p.n * p.ho * p.wo < 128


def _nchw_gemm(p):
    """An NCHW 1x1 layer that ``tiled`` runs as a GEMM on the input in place
    (:mod:`numbaconv.cpu.pointwise`; its deep, few-pixel ones on :mod:`numbaconv.cpu.dot`):
    faster than BLAS on every such layer of MobileNetV2 and ResNet-50 from 14x14 images up
    (the table above), at batch 1 and 8, and about as fast on 7x7 ones -- but not on tiny
    images, whose vector blocks of 16-32 pixels are mostly padding (EfficientNet's
    squeeze-and-excitation layers on 1x1 images: the model ran 41.5 -> 51.1 ms on Zen 1
    with those in tiled)."""
    return (p.layout == "NCHW" and p.groups == 1 and p.stride_h == p.stride_w == 1
            and p.ho * p.wo >= MIN_NCHW_GEMM_PIXELS)


def _nhwc_gemm_in_tiled(p):
    """An NHWC 1x1 layer on an Intel AVX-512 target (:func:`numbaconv.tuning.intel_avx512`):
    ``tiled``'s register blocks beat OpenBLAS's sgemm there (sixteenth session, Intel Xeon,
    2 threads, ``Conv2dPlan`` with ReLU, summed over the layers: ResNet-50's stride-1 1x1
    layers batch 1 6.5 -> 5.3 ms, batch 8 49.9 -> 42.6; MobileNetV2's 2.0 -> 1.7; ResNet-50's
    stride-2 ones 1.11 -> 0.73 ms on the 512 -> 1024 one).  Elsewhere BLAS as measured on Zen
    (the table above; ``numbaconv tune`` measures it per machine).  Grouped 1x1 layers keep
    BLAS: ShuffleNet-like 32 and 16 channels per group ran 8-10 % slower in ``tiled`` (80 and
    more per group 7-20 % faster)."""
    return p.layout == "NHWC" and p.groups == 1 and tuning.intel_avx512()


def _winograd_applies(p):
    """Winograd's own geometry test (its module, loaded through the registry)."""
    return REGISTRY["winograd"].impl.applies(p)
