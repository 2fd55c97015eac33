"""The register blocks of ``tiled``'s micro-kernels on the compile target: their sizes and
how a row of pixels (or, in :mod:`numbaconv.cpu.pointwise`, a column of output channels)
is covered by them; and the 8 x 8 register transposes between NCHW planes and channel
vectors.  Shared by :mod:`numbaconv.cpu.tiled` and the kernels that reuse its blocks
(pointwise, winograd, depthwise), and by the generator of :mod:`numbaconv.cpu._ukernels`.
"""

import math

import numpy as np

from ._jit import jit
from ._vec import copy2d, target_vector_bytes, transpose8

__all__ = ["GEMM_P_CHOICES", "GROUP_PACKS", "GROUP_PACK_LANES", "GROUP_PACK_P_CHOICES", "NARROW_P_CHOICES", "P", "P_CHOICES", "block_width", "driver_tag",
           "empty_aligned", "group_pack", "kernel_suffix", "narrow_blocks", "pixel_block", "pixel_blocks",
           "transpose_block", "vector_bytes"]

#: bytes the arrays that the register blocks load and store as vectors start on: a cache line
#: (NumPy's own allocations are 16-byte aligned; a 64-byte vector that straddles two lines is
#: two loads: on Intel Xeon the tiled micro-kernel ran ~10 % slower on such weights)
ALIGN = 64


def empty_aligned(shape, dtype):
    """``np.empty(shape, dtype)`` whose data starts on an :data:`ALIGN`-byte boundary."""
    dtype = np.dtype(dtype)
    n = math.prod(shape) if isinstance(shape, tuple) else int(shape)  # (np.prod: 3 us a call)
    raw = np.empty(n * dtype.itemsize + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape)

#: output pixels per micro-kernel call that fit the register file: 2P accumulators +
#: 2 weight vectors + a broadcast in 16 ymm (AVX2) or 32 zmm (AVX-512) registers.  AVX-512's
#: 14 x 2 zmm (28 accumulators, as oneDNN's direct kernel) reads each weight vector for twice
#: as many pixels as 8 x 2 did, and runs its reduction loop without unrolling
#: (:data:`numbaconv.cpu._vec.UNROLL_MAX_ACCUMULATORS`: four unrolled steps spilled): the
#: block alone, one core of an Intel Xeon, 5x5 over 32 channels, 152 (P = 7) / 166 (P = 8) ->
#: 177 GFLOP/s (its FMA peak: 214); 3x3 layers 3-8 %, the 7x7 stem 15 % faster
P_CHOICES = {16: (4, 6), 32: (4, 6), 64: (7, 14)}
#: the same blocks where their rows are a GEMM's (pointwise's output channels, Winograd's
#: tiles): there 14 x 2 ran slower than 8 x 2 (Intel Xeon: ResNet's 64 -> 256 1x1 NCHW 0.51 ->
#: 0.92 ms, Winograd's res5 1.21 -> 1.45 ms)
GEMM_P_CHOICES = {16: (4, 6), 32: (4, 6), 64: (7, 8)}
P = 6  # the default
#: the narrow blocks' pixel choices per vector width: ``V/2`` output channels in one register
#: per pixel (P accumulators + a weight vector + a broadcast), for layers with at most ``V/2``
#: output channels per group (grouped convolutions with 9-16 per group, ResNeXt / RegNet, and
#: dense layers with 9-16 output channels), which the two-register block would run half
#: empty (and, from 32 products per output, the few-channel layers the streaming kernel took:
#: see ``tiled.STREAM_MAX_REDUCTION``).  Intel Xeon, 2 threads, float32, 3x3, NCHW / NHWC: 16
#: per group at 28x28 0.74 -> 0.52 ms / 0.69 -> 0.41, dense 64 -> 16 at 56x56 0.56 -> 0.32 /
#: 0.52 -> 0.28.  AVX2 (8 lanes; 10 pixels at most: 12 accumulators, unrolled, spilled 14
#: registers of its 16), Zen 3, 2 threads, auto, two interleaved runs, NCHW / NHWC: RegNet's 8
#: per group (152 channels at 28x28) 0.68-0.71 -> 0.54-0.59 / 0.67 -> 0.43, 8 per group stride
#: 2 0.58 -> 0.42-0.48 / 0.49-0.56 -> 0.38-0.40, ResNeXt's 4 per group (128 at 56x56, which
#: streamed) 3.6-3.8 -> 2.2-2.5 / 4.2 -> 2.0-2.3, 64 -> 4 at 56x56 (streamed) 1.71-1.75 ->
#: 0.50-0.54 / 1.86 -> 0.50-0.56, 8 -> 4 at 112x112 0.52-0.56 -> 0.43-0.45 / 0.62 -> 0.44
NARROW_P_CHOICES = {32: (7, 10), 64: (7, 14)}
#: packed-group blocks (float32): ``m`` groups of ``lanes/m`` output channels share one register,
#: for grouped layers with as many input as output channels per group (4 or 8: ResNeXt's and
#: RegNet's), whose narrow block would hold one group in a quarter or half of its lanes.  Each
#: step broadcasts an ``m``-tuple of inputs (channel ``c`` of the ``m`` groups, interleaved in
#: the padded copy) as a load; P up to 10 keeps the broadcasts and accumulators in registers
#: (14 spilled).  Intel Xeon, one core, block alone, 3x3: 8 per group 127 useful GFLOP/s (the
#: narrow block: 70), 4 per group 105 (35).  AVX2: 2 groups of 4 per ymm (8 per group fill the
#: narrow block), P 7 / 10 without spills; Zen 3, 2 threads, auto, two interleaved runs, NCHW /
#: NHWC ms (narrow block -> packed): ResNeXt's 4 per group at 56x56 1.39-2.26 -> 1.05-1.15 /
#: 1.62-2.01 -> 1.10, 256 channels at 28x28 1.17-1.60 -> 0.63-0.75 / 0.92-0.94 -> 0.52-0.65,
#: stride 2 0.79-0.90 -> 0.51-0.58 / 0.68 -> 0.47-0.49
GROUP_PACK_P_CHOICES = {32: (7, 10), 64: (7, 10)}
#: groups per register, per vector width (AVX2: 2 groups of 4; 4 groups of 2 stream)
GROUP_PACKS = {32: (2,), 64: (2, 4)}
#: a packed-group register's lanes (float32): m groups of GROUP_PACK_LANES / m channels
GROUP_PACK_LANES = {32: 8, 64: 16}


def _width(vb, item):
    return max(8, min(32, 2 * vb // item))


#: one parallel driver per (V, pixel-block choices): the pixel block is a runtime argument
#: of the driver, so a new layer compiles nothing a layer of the same dtype compiled before
#: (V, pixel-block choices, vectors per pixel, groups per register): two registers per pixel, or
#: one (the narrow blocks), or one shared by m groups (float32 only)
_DRIVERS = tuple(sorted({(_width(vb, item), ps, 2, 1) for vb, ps in P_CHOICES.items() for item in (4, 8)}
                        | {(_width(vb, item) // 2, ps, 1, 1) for vb, ps in NARROW_P_CHOICES.items() for item in (4, 8)}
                        | {(GROUP_PACK_LANES[vb], ps, 1, m) for vb, ps in GROUP_PACK_P_CHOICES.items()
                           for m in GROUP_PACKS[vb]}))
_UK_SHAPES = tuple(sorted({(p_, v_, nv, m) for v_, ps, nv, m in _DRIVERS for p_ in ps}))
#: pointwise's parallel drivers (V, pixel-block choices): its blocks are generated inline
_POINTWISE_DRIVERS = tuple(sorted({(_width(vb, item), ps) for vb, ps in GEMM_P_CHOICES.items() for item in (4, 8)}))


def driver_tag(ps):
    return f"p{min(ps)}{max(ps)}"


def kernel_suffix(v_, nv, m=1):
    """``V`` in the generated names (``ukP_V``, ``tasks_V_TAG``), ``Vx1`` for a narrow block,
    ``Vx1mM`` for one of ``M`` packed groups."""
    return (f"{v_}" if nv == 2 else f"{v_}x{nv}") + (f"m{m}" if m > 1 else "")


def vector_bytes():
    """SIMD register width of the target Numba compiles for: 64 (AVX-512), 32 (AVX2) or 16
    (honours ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``, see :mod:`numbaconv.cpu._vec`)."""
    return target_vector_bytes()


def block_width(dtype):
    """``V``: output channels per micro-kernel (two SIMD registers' worth, at least 8)."""
    return _width(vector_bytes(), np.dtype(dtype).itemsize)


def group_pack(dtype, groups, cg, kg):
    """``m``: groups of a grouped layer that share one register of the packed-group blocks
    (:data:`GROUP_PACK_P_CHOICES`), or 1."""
    vb = vector_bytes()
    lanes = GROUP_PACK_LANES.get(vb, 0)
    m = lanes // kg if kg and lanes and lanes % kg == 0 else 0
    if (np.dtype(dtype) != np.float32 or vb not in GROUP_PACK_P_CHOICES or m not in GROUP_PACKS.get(vb, ())
            or cg != kg or groups < m):
        return 1
    return m


def narrow_blocks(dtype, kg, groups=1):
    """Whether ``kg`` output channels per group (of ``groups``) run on the narrow blocks (one
    register per pixel, :data:`NARROW_P_CHOICES`) on the compile target.  On AVX2 not dense
    layers with more than ``V/4`` output channels: 64 -> 8 at 56x56 ran 15-20 % slower
    narrow than in the half-empty two-register block (Zen 3; 8 per group and <= 4 output
    channels were faster narrow, see NARROW_P_CHOICES)."""
    if vector_bytes() not in NARROW_P_CHOICES or 2 * kg > block_width(dtype):
        return False
    return vector_bytes() >= 64 or groups > 1 or 4 * kg <= block_width(dtype)


def pixel_block(wo):
    """``P`` for output rows of ``wo`` pixels (the larger block of :func:`pixel_blocks`)."""
    return pixel_blocks(wo)[0]


def pixel_blocks(wo, choices=None):
    """``(P, split)``: a row of ``wo`` output pixels runs as blocks of ``P`` up to pixel
    ``split``, then blocks of the target's smaller ``P`` (the last one may run past the
    row): the least work, counting ~1.5 pixels' worth of fixed cost (weight loads, loop and
    store overhead) per micro-kernel call.  Mixing the two removes most of the padded work
    a single ``P`` leaves on narrow rows (14 = 6 + 4 + 4, not 4 x 4 = 16; 56 = 8 x 6 + 2 x 4,
    not 10 x 6 = 60)."""
    _, a, b, big, small = _cover(wo, choices)
    if b == 0 or a == 0:  # one size: the larger when it is all big blocks
        return (big, wo) if b == 0 else (small, wo)
    return big, a * big


def row_cost(wo, choices=None):
    """The work :func:`pixel_blocks`' cover of a row of ``wo`` pixels costs, in pixels."""
    return _cover(wo, choices)[0]


def _cover(wo, choices):
    """``(work, a, b, big P, small P)``: ``a`` blocks of the big ``P`` then ``b`` of the small
    one, the least work for ``wo`` pixels (see :func:`pixel_blocks`; ties: more big blocks)."""
    choices = P_CHOICES[vector_bytes()] if choices is None else choices
    big, small = max(choices), min(choices)
    best = None
    for a in range(-(-wo // big) + 1):
        b = -(-max(0, wo - a * big) // small)
        cost = (a * big + b * small + 1.5 * (a + b), -a)
        if best is None or cost < best[0]:
            best = (cost, a, b)
    (work, _), a, b = best
    return work, a, b, big, small


@jit(inline="always")  # (into its callers: one function less to compile)
def transpose_block(src, dst, s0, ss, d0, ds, ni, nj):
    """``dst[d0 + j*ds + i] = src[s0 + i*ss + j]`` for ``i < ni, j < nj`` (flat arrays), in
    8 x 8 blocks transposed in registers (:func:`numbaconv.cpu._vec.transpose8`): an NCHW
    row's channels into NHWC pixels, or back.  The edges (the last ``nj % 8`` columns of the
    whole blocks' rows, the last ``ni % 8`` rows) as scalar loops (:func:`copy2d`)."""
    i8 = ni - ni % 8
    j8 = nj - nj % 8
    for i0 in range(0, i8, 8):
        for j0 in range(0, j8, 8):
            transpose8(src, dst, s0 + i0 * ss + j0, ss, d0 + j0 * ds + i0, ds)
    copy2d(src, dst, s0 + j8, ss, 1, d0 + j8 * ds, 1, ds, i8, nj - j8)
    copy2d(src, dst, s0 + i8 * ss, ss, 1, d0 + i8, 1, ds, ni - i8, nj)
