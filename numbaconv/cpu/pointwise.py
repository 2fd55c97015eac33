"""``tiled``'s path for NCHW 1x1 layers (stride 1, no padding, one group): the input already
is the GEMM's matrix, so nothing is copied, packed or transposed.

    out[n, k, q] = sum over c of w[k, c] * x[n, c, q]

Each input channel plane ``x[n, c]`` holds the pixels ``q`` contiguously, and so does each
output row ``out[n, k]``.  The ``tiled`` micro-kernel (:func:`numbaconv.cpu._vec.conv_block`,
``P`` "pixels" broadcast x ``V`` "channels" loaded as vectors) runs with its roles swapped:
``P`` output channels broadcast from the OIHW weight rows, ``V`` output pixels loaded from
the channel planes (``V = 16`` float32 on AVX2, 32 on AVX-512), and the sums stored as
vectors straight into the output rows.  The same register blocks as ``tiled``'s, inlined
into one task function (``pointwise_V_TAG``, generated in :mod:`numbaconv.cpu._ukernels`).

Output channels run in blocks of the target's two ``P`` (4 and 6 on AVX2: every even
``K`` is a sum of them, :func:`numbaconv.cpu._blocking.pixel_blocks`); an odd ``K`` reads a copy
of the weights with zero rows appended (cached like tiled's packed weights).  A partial
last pixel block is computed on the ``V`` pixels that end the plane, read in place (it
overlaps the block before it; only its own pixels are stored), or, on planes under ``V``
pixels, on a zero-padded copy of its columns (``C x V`` values per task): never past the
input.  Planes of a few blocks split their tasks by output channels.  The block adds each
row's bias in its vector store
(``conv_block(..., row_bias=True)``); the fused epilogue runs over each task's part of
the output while it is still cached.

Why: MobileNetV2's and ResNet-50's NCHW 1x1 layers ran im2col's BLAS sgemm at 28-52
GFLOP/s on Zen 1 (thin GEMMs: 16-1280 rows), or ``tiled``'s NHWC copy and transposed stores.
"""

import functools

import numba
import numpy as np

from .. import tuning
from ._blocking import GEMM_P_CHOICES, block_width, driver_tag, pixel_blocks, vector_bytes
from ._launch import Task, type_key
from ._wcache import WeightCache
from .epilogue import NONE, arg_key

__all__ = ["MAX_CHANNELS", "MIN_PIXELS", "applies", "bind", "run", "layer", "clear_cache", "microkernel_asm"]

#: weights with appended zero rows (odd K): prepared once per weights, checked bit for bit
_CACHE = WeightCache(min_bytes=64 << 10, max_bytes=64 << 20)

#: output bytes (rows x pixel blocks) a task finishes at once: its epilogue pass then reads
#: them from L2
TASK_BYTES = 64 << 10

#: input channels x V pixels read by every channel block of a task: within L1 (Zen 1's 32 KiB
#: L1d: a 64 KiB panel of 1024 channels ran 15 % slower than blocks of 256)
PANEL_BYTES = 16 << 10

_TASKS = {}

#: planes of at most this many pixel blocks split their tasks by output channels first
FEW_PIXEL_BLOCKS = 4


#: fewest pixels per image for this path on AVX-512 targets: below two whole blocks of 32
#: pixels (MobileNet's and ResNet-50's 7x7 layers: 49 of 64 lanes used, the tail through a
#: copied panel) ``tiled``'s channel-vector blocks (7 pixels x 32 channels: no lane wasted)
#: ran 1.4-1.7x faster on Intel Xeon (320 -> 1280 @ 7x7: 0.31 -> 0.21 ms), at 14x14 1.3x
#: slower; on AVX2 both paths pad 7-pixel rows alike
MIN_PIXELS = 64 if vector_bytes() >= 64 else 0


#: float32 layers with at least this many input *and* output channels run ``tiled``'s
#: channel-vector blocks instead: every pixel block here streams all the weights (256 KiB+)
#: again, which the packed blocks read once per band of rows.  2 threads, Conv2dPlan: Intel
#: Xeon (AVX-512, 14-pixel blocks), batch 1 / 8: 1024 -> 512 at 14x14 1.06 -> 0.77 / 8.0 ->
#: 5.8 ms, 256 -> 1024 at 14x14 0.46 -> 0.39 / 3.6 -> 3.0, 512 -> 256 at 28x28 0.89 -> 0.81 /
#: 7.1 -> 6.7; below, e.g. 512 -> 128 at 28x28 0.42 / 3.5 ms here, 0.46 / 3.9 there.  Zen 3
#: (AVX2), batch 1, as multiples of onnxruntime's time in the same process (the shared host's
#: speed drifted 2x): 1024 -> 512 at 14x14 1.47-1.61 -> 1.07, 512 -> 256 at 28x28 1.22-1.43 ->
#: 0.89-1.04, 256 -> 1024 at 14x14 1.30-1.33 -> 0.98-1.22, 2048 -> 512 at 7x7 1.65 -> 1.17;
#: (through ``conv2d``, packed copy checked per call: 1.64 -> 1.35, 1.26 -> 1.12, 1.46 ->
#: 1.25); below, 128 -> 512 at 28x28 1.16 here, 1.44 there.  float64 is not measured: unchanged
MAX_CHANNELS = 256


def applies(p):
    """An NCHW 1x1 layer that reads its input in place: stride 1, no padding, one group (and,
    on AVX-512, at least :data:`MIN_PIXELS` pixels and, float32, fewer than
    :data:`MAX_CHANNELS` input or output channels)."""
    return (p.layout == "NCHW" and p.r == 1 and p.s == 1 and not p.has_padding and p.groups == 1
            and p.stride_h == 1 and p.stride_w == 1 and p.ho * p.wo >= MIN_PIXELS
            and (min(p.c, p.k) < MAX_CHANNELS or p.dtype != np.float32))


def _task(dtype):
    name = f"pointwise_{block_width(dtype)}_{driver_tag(GEMM_P_CHOICES[vector_bytes()])}"
    if name not in _TASKS:
        from . import _ukernels
        _TASKS[name] = Task(getattr(_ukernels, name))
    return _TASKS[name]


def layer(p):
    """The decisions for problem ``p``: ``(starts, V, nqb, qbs, nqc, kbs, jobs)`` -- the output
    channel blocks' first rows (and the covered end), pixels per block, pixel blocks per
    image, pixel blocks per task, tasks along them, channel blocks per task, tasks."""
    return _layer(p, numba.get_num_threads(), tuning.generation())


@functools.lru_cache(maxsize=1024)
def _layer(p, threads, _generation):
    choices = GEMM_P_CHOICES[vector_bytes()]
    big, split = pixel_blocks(p.k, choices)
    starts, k0 = [], 0
    while k0 < p.k:  # (the driver's rule: the larger block before split, then the smaller)
        starts.append(k0)
        k0 += big if k0 < split else min(choices)
    starts.append(k0)
    starts = np.array(starts, dtype=np.int64)
    v_ = block_width(p.dtype)
    hw = p.ho * p.wo
    nqb = -(-hw // v_)
    nkb = starts.size - 1
    qbs = max(1, min(nqb, TASK_BYTES // (p.k * v_ * p.dtype.itemsize)))
    kbs = nkb
    # enough tasks for the threads: fewer pixel blocks per task, then fewer channel blocks --
    # except on planes of a few blocks (7x7), split by channels first: a task then has every
    # pixel block, and a cheaper tail block (read in place, no copy) does not leave the
    # thread without it waiting (960 -> 160 at 7x7 took as long as at 8x8)
    few = nqb <= FEW_PIXEL_BLOCKS
    if few:
        qbs = nqb
    while p.n * -(-nqb // qbs) * -(-nkb // kbs) < 4 * threads and (qbs > 1 or kbs > 1):
        if qbs > 1 and not (few and kbs > 1):
            qbs = -(-qbs // 2)
        else:
            kbs = -(-kbs // 2)
    nqc = -(-nqb // qbs)
    return starts, v_, nqb, qbs, nqc, kbs, p.n * nqc * -(-nkb // kbs)


def _weight_rows(w, rows):
    """``w`` (OIHW, K x C x 1 x 1) as a flat array of ``rows >= K`` rows (zero rows appended)."""
    k_ = w.shape[0]
    if rows == k_:
        return w.reshape(-1)

    def build():
        wp = np.zeros((rows, w.shape[1]), dtype=w.dtype)
        wp[:k_] = w.reshape(k_, -1)
        return wp.reshape(-1)
    return _CACHE.get(("pointwise", rows), w, build)


def clear_cache():
    """Forget every cached weight array with appended rows (``numbaconv.clear_caches``)."""
    _CACHE.clear()


def bind(p, w, bias):
    """:func:`run` for problem ``p`` as a function of ``(x, out, epi)`` (see ``tiled.bind``)."""
    starts, v_, nqb, qbs, nqc, kbs, jobs = layer(p)
    rows = int(starts[-1])
    wf = _weight_rows(np.ascontiguousarray(w), rows)
    # one bias per weight row (a private copy: its type is fixed); without one -0.0, which
    # adds nothing (x + -0.0 is x, -0.0 included)
    bp = np.full(rows, -0.0, dtype=p.dtype)
    if bias is not None:
        bp[:p.k] = bias
    task = _task(p.dtype)
    cb = max(8, PANEL_BYTES // (v_ * p.dtype.itemsize))
    cb = -(-p.c // -(-p.c // cb))  # balanced blocks
    args = (starts, p.c, p.k, p.ho * p.wo, nqb, qbs, nqc, kbs, cb, p.dtype.type(0))

    def call(x, out, epi):
        of = out.reshape(-1)
        ea = epi.kernel_arg(of)
        xf = x.reshape(-1)
        task.run((type_key(xf), type_key(of), arg_key(ea)), jobs, wf, xf, of, bp, *args, ea)
    return call


def run(p, x, w, bias, out, epi=NONE):
    """``x`` NCHW and ``w`` OIHW, C-contiguous; ``epi``: the fused epilogue."""
    bind(p, w, bias)(np.ascontiguousarray(x), out, epi)


def microkernel_asm(dtype=np.float32):
    """Machine code of the task function for ``dtype`` on the compile target (its hot loop:
    the larger register block), compiled afresh (Numba cannot inspect cached code)."""
    fn = numba.njit(cache=False, nogil=True, fastmath={"contract"})(_task(dtype).task.py_func)
    t = numba.from_dtype(np.dtype(dtype))
    a = t[::1]
    i = numba.int64
    sig = (i, i, a, a, a, a, i[::1]) + (i,) * 8 + (t, numba.none)
    fn.compile(sig)
    return fn.inspect_asm(sig)
