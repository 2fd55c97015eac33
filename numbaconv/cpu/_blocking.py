"""The register blocks of ``tiled``'s micro-kernels on the compile target: their sizes and
how a row of pixels (or, in :mod:`numbaconv.cpu.pointwise`, a column of output channels)
is covered by them; and the 8 x 8 register transposes between NCHW planes and channel
vectors.  Shared by :mod:`numbaconv.cpu.tiled` and the kernels that reuse its blocks
(pointwise, winograd, depthwise), and by the generator of :mod:`numbaconv.cpu._ukernels`.
"""

import numpy as np

from ._jit import jit
from ._vec import target_vector_bytes, transpose8

__all__ = ["P", "P_CHOICES", "block_width", "driver_tag", "empty_aligned", "pixel_block", "pixel_blocks",
           "transpose_block", "vector_bytes"]

#: bytes the arrays that the register blocks load and store as vectors start on: a cache line
#: (NumPy's own allocations are 16-byte aligned; a 64-byte vector that straddles two lines is
#: two loads: on Intel Xeon the tiled micro-kernel ran ~10 % slower on such weights)
ALIGN = 64


def empty_aligned(shape, dtype):
    """``np.empty(shape, dtype)`` whose data starts on an :data:`ALIGN`-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(n * dtype.itemsize + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + n * dtype.itemsize].view(dtype).reshape(shape)

#: output pixels per micro-kernel call that fit the register file: 2P accumulators +
#: 2 weight vectors + a broadcast in 16 ymm (AVX2) or 32 zmm (AVX-512) registers
P_CHOICES = {16: (4, 6), 32: (4, 6), 64: (7, 8)}
P = 6  # the default


def _width(vb, item):
    return max(8, min(32, 2 * vb // item))


#: one parallel driver per (V, pixel-block choices): the pixel block is a runtime argument
#: of the driver, so a new layer compiles nothing a layer of the same dtype compiled before
_DRIVERS = tuple(sorted({(_width(vb, item), ps) for vb, ps in P_CHOICES.items() for item in (4, 8)}))
_UK_SHAPES = tuple(sorted({(p_, v_) for v_, ps in _DRIVERS for p_ in ps}))


def driver_tag(ps):
    return f"p{min(ps)}{max(ps)}"


def vector_bytes():
    """SIMD register width of the target Numba compiles for: 64 (AVX-512), 32 (AVX2) or 16
    (honours ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``, see :mod:`numbaconv.cpu._vec`)."""
    return target_vector_bytes()


def block_width(dtype):
    """``V``: output channels per micro-kernel (two SIMD registers' worth, at least 8)."""
    return _width(vector_bytes(), np.dtype(dtype).itemsize)


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
    choices = P_CHOICES[vector_bytes()] if choices is None else choices
    big, small = max(choices), min(choices)
    best = None
    for a in range(-(-wo // big) + 1):
        b = -(-max(0, wo - a * big) // small)
        cost = (a * big + b * small + 1.5 * (a + b), -a)
        if best is None or cost < best[0]:
            best = (cost, a, b)
    _, a, b = best
    if b == 0 or a == 0:  # one size: the larger when it is all big blocks
        return (big, wo) if b == 0 else (small, wo)
    return big, a * big


@jit(inline="always")  # (into its callers: one function less to compile)
def transpose_block(src, dst, s0, ss, d0, ds, ni, nj):
    """``dst[d0 + j*ds + i] = src[s0 + i*ss + j]`` for ``i < ni, j < nj`` (flat arrays), in
    8 x 8 blocks transposed in registers (:func:`numbaconv.cpu._vec.transpose8`): an NCHW
    row's channels into NHWC pixels, or back."""
    i8 = ni - ni % 8
    j8 = nj - nj % 8
    for i0 in range(0, i8, 8):
        for j0 in range(0, j8, 8):
            transpose8(src, dst, s0 + i0 * ss + j0, ss, d0 + j0 * ds + i0, ds)
        for j in range(j8, nj):
            for i in range(i0, i0 + 8):
                dst[d0 + j * ds + i] = src[s0 + i * ss + j]
    for i in range(i8, ni):
        for j in range(nj):
            dst[d0 + j * ds + i] = src[s0 + i * ss + j]
