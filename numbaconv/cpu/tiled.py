"""``tiled``: cache- and register-blocked direct convolution (the fast CPU path).

Data layout (built inside :func:`run`, counted in its time):

* input  -> zero-padded NHWC copy ``xp (N, Hp, Wp, C)``: zero padding is materialised once,
  so the hot loops have no borders and never read out of bounds (``Wp`` has a few extra
  zero columns so the last pixel block of a row may run past ``Wo``; those results are
  discarded);
* weights -> packed ``(G, K/G/V, C-blocks, R, S, c, V)``: for one output-channel block the
  micro-kernel streams ``V`` contiguous weights per input channel and tap (zero-padded
  past ``K/G``), like oneDNN's ``OIhw8i8o`` / TVM's ``OIHWoi``.  NHWC's HWIO weights with
  ``K/G`` a multiple of ``V`` already hold each block's ``V`` weights contiguously per
  (tap, input channel): they are read in place, with no packing and no cache check;
* output -> written in place in the caller's layout, bias fused into the first store.

Register blocking: the micro-kernel ``ukP_V`` (generated, in :mod:`numbaconv.cpu._ukernels`)
keeps ``P`` output pixels x ``V`` output channels in registers -- ``V = 2`` vectors of the
target's width: 16 float32 / 8 float64 on AVX2 (P = 4-6: 2P ymm accumulators, like
oneDNN's avx2 kernel) and 32 / 16 on AVX-512 (P = 7 or 14, zmm: 28 accumulators, as oneDNN); on AVX-512, layers with at most
``V/2`` output channels per group (ResNeXt's and RegNet's groups, 9-16-channel layers) run
*narrow* blocks of one register per pixel instead (``V/2`` channels, P = 7 or 14), which
the two-register block would run half empty; and float32 grouped layers with 4 or 8 input and
output channels per group run *packed-group* blocks, one register shared by a set of 4 or 2
groups (P = 7 or 10): the padded copy interleaves each set's channels, so a reduction step
broadcasts channel ``c`` of every group in the set as one tuple load
(:func:`numbaconv.cpu._vec.conv_block`'s ``m``).  For every input channel and
tap it loads ``V`` weights (2 vector loads) and broadcasts ``P`` input values: 2P FMAs per
``2 + P`` loads.  Cache blocking: input channels in blocks of ``cb`` so the packed
weights of one block (``R*S*cb*V`` values) stay in L2 while a band of output rows is
swept; partial sums of later channel blocks are added into the output.  Work is split
across threads (:mod:`numbaconv.cpu._launch`) over (batch x output-row bands x groups x
output-channel blocks), so batch 1 uses every core.

The register block is written as explicit LLVM vectors (:func:`numbaconv.cpu._vec.conv_block`:
``<W x float>`` loads, broadcasts, ``llvm.fmuladd``): it compiles in a fraction of a second
to the same registers on every x86-64 family, whatever width LLVM's vectorisers prefer
there (Intel's server models prefer 256 bits, which split the former scalar-accumulator
kernels, packed by the SLP vectoriser, into ymm halves).  The width is the compile
target's (:func:`vector_bytes`).  ``tests/test_codegen.py`` reads the hot loop's machine
code for Zen 3, Zen 4, Skylake-SP, Sapphire Rapids and the host.

Depthwise convolutions (``groups == C``) go to :mod:`numbaconv.cpu.depthwise`; few-channel,
memory-bound problems (``K/G`` much smaller than ``V`` and, where narrow blocks exist, a short
reduction: RGB inputs) to the streaming kernels there too;
deep NCHW layers with few output pixels and large weights (ResNet's res5) to
:mod:`numbaconv.cpu.dot`, which reads the OIHW weights in place instead of packing them.

Regenerate :mod:`numbaconv.cpu._ukernels` with ``python -m numbaconv.cpu.tiled``.
"""

import dataclasses
import functools

import numba
import numpy as np

from .. import tuning
from . import depthwise, dot, naive, pointwise
from ._jit import copy_run, fill_run, jit, move_run, zero_run
from ._vec import interleave
from ._launch import Task, type_key
from ._blocking import (_DRIVERS, _POINTWISE_DRIVERS, _UK_SHAPES, GROUP_PACK_LANES, GROUP_PACK_P_CHOICES, NARROW_P_CHOICES, P,  # noqa: F401
                        P_CHOICES,
                        block_width, driver_tag, empty_aligned, group_pack, kernel_suffix, narrow_blocks,
                        pixel_block, pixel_blocks, row_cost, transpose_block, vector_bytes)
from ._wcache import WeightCache
from .epilogue import NONE, after, arg_key

__all__ = ["run", "plan", "packed_weights", "clear_cache", "WEIGHT_LAYOUTS", "microkernel", "microkernel_asm", "generate_source", "P",
           "transpose_block"]

def _blocks(dtype, nv, m=1):
    """``(V, pixel-block choices)`` of ``dtype``'s blocks of ``nv`` registers per pixel, shared
    by ``m`` groups."""
    if nv == 2:
        return block_width(dtype), P_CHOICES[vector_bytes()]
    if m > 1:
        return GROUP_PACK_LANES[vector_bytes()], GROUP_PACK_P_CHOICES[vector_bytes()]
    return block_width(dtype) // 2, NARROW_P_CHOICES[vector_bytes()]


def microkernel(dtype, p_=P, nv=2, m=1):
    from . import _ukernels
    return getattr(_ukernels, f"uk{p_}_{kernel_suffix(_blocks(dtype, nv, m)[0], nv, m)}")


_TASKS = {}


def _driver(dtype, nv=2, m=1):
    """The task function of ``dtype``'s micro-kernels of ``nv`` registers per pixel shared by
    ``m`` groups (:class:`numbaconv.cpu._launch.Task`)."""
    v_, ps = _blocks(dtype, nv, m)
    name = f"tasks_{kernel_suffix(v_, nv, m)}_{driver_tag(ps)}"
    if name not in _TASKS:
        from . import _ukernels
        _TASKS[name] = Task(getattr(_ukernels, name))
    return _TASKS[name]


def microkernel_asm(dtype=np.float32, p_=P, nv=2, m=1):
    """Machine code of the ``p_``-pixel micro-kernel (``nv`` registers per pixel, shared by ``m``
    groups) for ``dtype`` on the compile target.  Compiled afresh (no cache: Numba cannot
    inspect code loaded from its cache)."""
    uk = numba.njit(cache=False, nogil=True, fastmath={"contract"})(microkernel(dtype, p_, nv, m).py_func)
    t = numba.from_dtype(np.dtype(dtype))
    a = t[::1]
    i = numba.intp
    sig = (a, a, a, i, i, i, i, i, i, i, i, i, i, a, i, i, i, numba.boolean, t, a, i, i)
    uk.compile(sig)
    return uk.inspect_asm(sig)


# --- layout preparation ----------------------------------------------------------------------
@jit(inline="always")  # (into each copy: one function less to compile per copy)
def _start_row(of, job, hp, wp, c_, pt, pl, h_, w_):
    """Padded row ``job`` (over ``n * Hp``) of the flat NHWC copy ``of``: zero its padding
    columns and return the image row it holds, or zero all of it and return -1 (a row of
    top / bottom padding)."""
    h = job % hp - pt
    o = job * wp * c_
    if h < 0 or h >= h_:
        zero_run(of, o, wp * c_)
        return -1
    zero_run(of, o, pl * c_)
    zero_run(of, o + (pl + w_) * c_, (wp - pl - w_) * c_)
    return h


@jit
def _pad_nchw_to_nhwc(lo, hi, xf, of, hp, wp, c_, xh, xw, pt, pl, h_, w_, ssh, cs):
    """Padded rows ``[lo, hi)`` (over ``n * Hp``) of ``xp[n, pt + i, pl + j, c] = x[n, c,
    i*ssh, j]`` (NCHW source ``x`` (N, cs, xh, xw), both flat) for ``i < h_, j < w_, c < cs``;
    every other entry 0 (``c_ > cs``: a packed-group layer's partial last set).  The image
    part of a row through 8 x 8 register transposes.  (One function per source layout: a
    layer compiles only the copy it needs.  Flat arguments: a ``reshape`` in the kernel
    compiled Numba's reshape helper, 0.5 s of a fresh install's first call on Zen 1.)"""
    hw = xh * xw
    for job in range(lo, hi):
        h = _start_row(of, job, hp, wp, c_, pt, pl, h_, w_)
        if h < 0:
            continue
        n = job // hp
        o = job * wp * c_
        # of[dst + w*C + c] = xf[src + c*H*W + w]: the row's channels become its pixels' vectors
        transpose_block(xf, of, n * cs * hw + h * ssh * xw, hw, o + pl * c_, c_, cs, w_)
        if cs < c_:
            for j in range(w_):
                zero_run(of, o + (pl + j) * c_ + cs, c_ - cs)


@jit
def _pad_nhwc(lo, hi, xf, of, hp, wp, c_, xh, xw, pt, pl, h_, w_, ssh, ssw, cs):
    """Padded rows ``[lo, hi)`` of ``xp[n, pt + i, pl + j, c] = x[n, i*ssh, j*ssw, c]`` (NHWC
    source ``x`` (N, xh, xw, cs), both flat) for ``i < h_, j < w_, c < cs``; every other entry 0
    (``ssh, ssw > 1``: a strided 1x1 layer's subsampling; ``c_ > cs``: see
    :func:`_pad_nchw_to_nhwc`).  (Flat: see :func:`_pad_nchw_to_nhwc`.)"""
    row = xw * cs
    for job in range(lo, hi):
        h = _start_row(of, job, hp, wp, c_, pt, pl, h_, w_)
        if h < 0:
            continue
        n = job // hp
        o = job * wp * c_
        src = (n * xh + h * ssh) * row
        dst = o + pl * c_
        # (copy_run, not slice assignments: see numbaconv.cpu._jit.copy_run)
        if ssw == 1 and cs == c_:  # one contiguous run
            move_run(of, dst, xf, src, w_ * c_)
        else:
            for j in range(w_):
                copy_run(of, dst + j * c_, xf, src + j * ssw * cs, cs)
                if cs < c_:
                    zero_run(of, dst + j * c_ + cs, c_ - cs)


@jit
def _pad_nchw_strided(lo, hi, x, of, hp, wp, c_, pt, pl, h_, w_, ssh, ssw):
    """Padded rows ``[lo, hi)`` of the strided-1x1 subsampling copy from NCHW (``ssw > 1``),
    into the flat ``of``: element by element.  (Flat: see :func:`_pad_nchw_to_nhwc`.)"""
    for job in range(lo, hi):
        h = _start_row(of, job, hp, wp, c_, pt, pl, h_, w_)
        if h < 0:
            continue
        n = job // hp
        o = job * wp * c_
        for j in range(w_):
            for c in range(c_):
                of[o + (pl + j) * c_ + c] = x[n, c, h * ssh, j * ssw]


_PAD_NCHW = Task(_pad_nchw_to_nhwc)
_PAD_NHWC = Task(_pad_nhwc)
_PAD_STRIDED = Task(_pad_nchw_strided)


def _pad_to_nhwc(x, xp, nchw, pt, pl, h_, w_, ssh, ssw):
    """``xp[n, pt + i, pl + j, c] = x[n, c, i*ssh, j*ssw]`` (or the NHWC source's) for
    ``i < h_, j < w_``; every other entry 0.  ``ssh, ssw > 1`` subsample (strided 1x1).
    Rows split across threads by :class:`numbaconv.cpu._launch.Task` (a ``prange`` copy loop
    cost ~1.2 s more compile on a fresh install: Numba's parfor passes).  ``xp`` may hold more
    channels than ``x`` (a packed-group 3x3 layer's last, partial set): those are 0 (not in the
    strided 1x1 copy, which no packed-group layer takes)."""
    cs = x.shape[1] if nchw else x.shape[3]
    rows = xp.shape[0] * xp.shape[1]
    of = xp.reshape(-1)
    padded = tuple(map(int, xp.shape[1:]))  # Hp, Wp, C
    g = (int(pt), int(pl), int(h_), int(w_), int(ssh))  # (the geometry: Python ints)
    if nchw and ssw != 1:
        _PAD_STRIDED.run((type_key(x), type_key(of)), rows, x, of, *padded, *g, int(ssw))
        return
    xf = x.reshape(-1)
    key = (type_key(xf), type_key(of))
    if nchw:
        _PAD_NCHW.run(key, rows, xf, of, *padded, int(x.shape[2]), int(x.shape[3]), *g, int(cs))
    else:
        _PAD_NHWC.run(key, rows, xf, of, *padded, int(x.shape[1]), int(x.shape[2]), *g, int(ssw), int(cs))


def _pack_weights(w, groups, kbg, cb, v_):
    """OIHW ``w`` -> flat packed ``(G, KBg, C-blocks, R, S, cl, V)``; zero past ``K/G``.

    NumPy (a transposing copy per input-channel block): the compiled loop cost 0.6-0.9 s of
    a fresh install's first layer (Zen 1) for a copy that weights from 64 KiB on do once
    (they are cached, see :func:`packed_weights`) and smaller ones in tens of microseconds."""
    k_, cg, r_, s_ = w.shape
    kg = k_ // groups
    w5 = w.reshape(groups, kg, cg, r_, s_)
    if kbg * v_ != kg:
        w5 = np.concatenate([w5, np.zeros((groups, kbg * v_ - kg, cg, r_, s_), w.dtype)], axis=1)
    w6 = w5.reshape(groups, kbg, v_, cg, r_, s_)
    out = empty_aligned((groups, kbg, r_ * s_ * cg * v_), w.dtype)
    for c0 in range(0, cg, cb):
        cl = min(cb, cg - c0)
        # block c0's (r, s, c, v) after the blocks before it, within each (group, K block)
        out[:, :, c0 * r_ * s_ * v_:(c0 + cl) * r_ * s_ * v_] = (
            w6[:, :, :, c0:c0 + cl].transpose(0, 1, 4, 5, 3, 2).reshape(groups, kbg, -1))
    return out.reshape(-1)


@jit
def _pack_hwio(lo, hi, w, wp, groups, kbg, cb, v_):
    """Jobs ``[lo, hi)`` (job: input-channel block x tap) of HWIO ``w`` (R, S, C/G, K) -> the
    same packed layout.

    Reads ``w`` row by row (a row: the ``K`` outputs of one tap and input channel) and
    scatters each row's ``V``-runs to the ``K/V`` output-channel blocks: one sequential
    read stream, a handful of sequential write streams (strided patterns thrash the TLB).
    """
    r_, s_, cg, k_ = w.shape
    rs = r_ * s_
    kg = k_ // groups
    wf = w.reshape(-1)
    for job in range(lo, hi):
        cbi = job // rs
        t = job % rs
        c0 = cbi * cb
        cl = min(cb, cg - c0)
        for c in range(cl):
            src = (t * cg + c0 + c) * k_
            for g in range(groups):
                for kb in range(kbg):
                    nk = min(v_, kg - kb * v_)
                    dst = ((g * kbg + kb) * rs * cg + c0 * rs + t * cl + c) * v_
                    s0 = src + g * kg + kb * v_
                    copy_run(wp, dst, wf, s0, nk)
                    fill_run(wp, dst + nk, v_ - nk, wp.dtype.type(0))


_PACK_HWIO = Task(_pack_hwio)


def _pack_group_sets(w, wlayout, groups, m):
    """The weights of ``groups`` sets of ``m`` groups (``kg = cg`` output channels each, ``16 = m *
    kg``; the last set may be partial: zero weights) -> flat packed ``(groups, R, S, cg, kg, m)``:
    lane ``k*m + i`` of a set's register is output channel ``k`` of its group ``i``, the order
    of the packed-group blocks' accumulators."""
    oihw = w if wlayout == "OIHW" else w.transpose(3, 2, 0, 1)
    k_, cg, r_, s_ = oihw.shape
    if k_ < groups * m * cg:
        oihw = np.concatenate([oihw, np.zeros((groups * m * cg - k_, cg, r_, s_), w.dtype)])
    w6 = oihw.reshape(groups, m, cg, cg, r_, s_).transpose(0, 4, 5, 3, 2, 1)
    out = empty_aligned(w6.shape, w.dtype)
    out[...] = w6
    return out.reshape(-1)


#: a packed-group set's lanes on the compile target (16 on targets without packed groups: the
#: width of the AVX-512 sets that tests/test_tiled.py runs there as stand-ins)
_LANES = GROUP_PACK_LANES.get(vector_bytes(), 16)
_SETS2, _SETS4 = interleave(2, _LANES), interleave(4, _LANES)


@jit
def _interleave_sets2(lo, hi, of, c_):
    """Pixels ``[lo, hi)`` of the flat padded NHWC copy ``of`` (``c_`` channels each, a multiple
    of :data:`_LANES`): each set of 2 groups' ``_LANES / 2`` channels from group-major to
    channel-major order, so a packed-group block's step reads channel ``c`` of its groups as one
    tuple (one register permutation per set)."""
    for q in range(lo * c_, hi * c_, _LANES):
        _SETS2(of, q)


@jit
def _interleave_sets4(lo, hi, of, c_):
    """:func:`_interleave_sets2` for sets of 4 groups of ``_LANES / 4`` channels."""
    for q in range(lo * c_, hi * c_, _LANES):
        _SETS4(of, q)


_INTERLEAVE = {2: Task(_interleave_sets2), 4: Task(_interleave_sets4)}


# --- packed-weight cache -------------------------------------------------------------------
#: packed copies of weights from 8 KiB on, reused while the weights are bit-for-bit unchanged
#: (the check of a 40 KiB array, one serial pass, costs a fraction of repacking it: Intel Xeon,
#: 2 threads, conv2d of RegNet's 19 groups of 8 at 28x28 301 -> 237 us NHWC, 391 -> 327 NCHW;
#: dense layers with small weights unchanged within 2 %)
_CACHE = WeightCache(min_bytes=8 << 10, max_bytes=256 << 20)

#: NHWC weights under this many bytes are read in place whatever their rows' spacing (see
#: :func:`_plan`: 16 pages at most, too few for the page lottery that larger ones draw)
HWIO_SMALL_BYTES = 64 << 10
_cache_stats = _CACHE.stats


def packed_weights(w, wlayout, groups, kbg, cb, v_, m=1):
    """Packed weights for ``w`` (C-contiguous, ``wlayout`` "OIHW" or "HWIO"; ``m > 1``: for the
    blocks shared by ``m`` groups, ``groups`` sets of them); large ones cached
    (:class:`numbaconv.cpu._wcache.WeightCache`)."""
    def build():
        if m > 1:
            return _pack_group_sets(w, wlayout, groups, m)
        r_, s_ = (w.shape[2], w.shape[3]) if wlayout == "OIHW" else (w.shape[0], w.shape[1])
        cg = w.shape[1] if wlayout == "OIHW" else w.shape[2]
        if wlayout == "OIHW":
            return _pack_weights(w, groups, kbg, cb, v_)
        wpk = empty_aligned(groups * kbg * r_ * s_ * cg * v_, w.dtype)
        _PACK_HWIO((cg + cb - 1) // cb * r_ * s_, w, wpk, groups, kbg, cb, v_)
        return wpk
    return _CACHE.get((wlayout, groups, kbg, cb, v_, m), w, build)


def clear_cache():
    """Forget every cached packed weight array (and :mod:`numbaconv.cpu.pointwise`'s weights
    with zero rows appended)."""
    _CACHE.clear()
    pointwise.clear_cache()


# --- planning --------------------------------------------------------------------------------
def plan(p, m=1):
    """Blocking for problem ``p``: dict(P, split, V, nv, m, cb, rows, kbg, kbs, hp, wp, hwio) (a
    fresh copy; ``nv``: registers of ``V`` output channels per pixel, 2 or 1 -- the narrow
    blocks; ``m > 1``: ``p``'s groups are sets of ``m`` groups sharing one register)."""
    return dict(_plan(p, numba.get_num_threads(), tuning.generation(), m))


@functools.lru_cache(maxsize=1024)
def _plan(p, threads, _generation, m=1):
    """:func:`plan`, once per problem, thread count and set of tuning knobs (``conv2d`` binds
    on every call: on a small layer the planning arithmetic cost as much as the kernel)."""
    # one register of output channels per pixel where two would run half empty (<= V/2 per group)
    nv = 1 if m > 1 or narrow_blocks(p.dtype, p.kg, p.groups) else 2
    v_, choices = _blocks(p.dtype, nv, m)
    forced = tuning.value("tiled.pixel_block")  # 0: by the output width
    p_, split = (forced, p.wo) if forced in choices else pixel_blocks(p.wo, choices)
    item = p.dtype.itemsize
    # Input-channel block: the packed weights of one block (R*S*cb*V) within ~128 KiB (L2;
    # the budget is a tuning knob, numbaconv.tuning).
    cb = max(8, tuning.value("tiled.cb_bytes") // (p.r * p.s * v_ * item))
    cb = min(p.cg, cb)
    nblk = -(-p.cg // cb)
    cb = -(-p.cg // nblk)  # balance the blocks
    if m > 1:
        cb = p.cg  # (a set's interleaved channels: one block)
    # Output-row bands: enough tasks for the threads, each band's input rows within ~L2.
    kbg = -(-p.kg // v_)
    # NHWC: a task sweeps several channel blocks (innermost) per input pixel block, so that its
    # outputs are whole pixels, not one block's V channels of each (1 KiB+ apart): the fused
    # epilogue then runs over contiguous memory (NHWC 64->256 1x1 at 56, batch 8, with a
    # residual and ReLU: 6.1 -> 4.0 ms on Intel Xeon; 3.65 -> 3.13 without an epilogue), while
    # those blocks' weights (of one input-channel block) stay within the knob's budget in L2;
    # and only while rows of single-pixel height leave enough tasks for the threads
    kbs = 1
    rows = _band_rows(p, kbg, 1, threads)
    if p.layout == "NHWC":
        wide = max(1, min(kbg, tuning.value("tiled.task_weight_bytes") // (p.r * p.s * cb * v_ * item)))
        while wide > 1 and p.n * p.groups * -(-kbg // wide) * p.ho < 4 * threads:
            wide = (wide + 1) // 2
        wide = -(-kbg // -(-kbg // wide))  # (equal parts)
        wide_rows = _band_rows(p, kbg, wide, threads)
        # ... unless its fewer, taller tasks split worse over the threads (17x17 rows in bands
        # of 5, 5, 5, 2: 0.43 instead of 0.39 ms for Inception's 128-channel 3x3, Intel Xeon)
        if wide > 1 and _imbalance(p, kbg, wide, wide_rows, threads) <= _imbalance(p, kbg, 1, rows, threads) + 0.05:
            kbs, rows = wide, wide_rows
    hp = p.h + p.pad_top + p.pad_bottom
    # where the row's last pixel block ends (past wo): blocks of p_ up to split, then the smaller
    after, size = (0, p_) if split >= p.wo else (split, min(choices))
    covered = after + -(-(p.wo - after) // size) * size
    wp = max(p.w + p.pad_left + p.pad_right, (covered - 1) * p.stride_w + (p.s - 1) * p.dil_w + 1)
    # NHWC: read the HWIO weights in place (see bind) while rows of K weights are short and a
    # block's rows are few, or the weights are small (HWIO_SMALL_BYTES)
    hwio = (m == 1 and p.layout == "NHWC" and p.kg % v_ == 0 and p.k * item < tuning.value("tiled.hwio_inplace_bytes")
            and (p.r * p.s * p.cg * v_ * item <= HWIO_INPLACE_BLOCK_BYTES
                 or p.r * p.s * p.cg * p.k * item < HWIO_SMALL_BYTES))
    return dict(P=p_, split=split, V=v_, nv=nv, m=m, cb=cb, rows=rows, kbg=kbg, kbs=kbs, hp=hp, wp=wp, hwio=hwio)


def _band_rows(p, kbg, kbs, threads):
    """Output rows per task for tasks of ``kbs`` channel blocks: enough tasks for the threads
    (4 each), each band's padded input rows within the ``tiled.band_bytes`` budget (~L2)."""
    jobs_per_row = p.n * p.groups * -(-kbg // kbs)
    rows = p.ho
    while rows > 1 and jobs_per_row * (-(-p.ho // rows)) < 4 * threads:
        rows = (rows + 1) // 2
    row_bytes = ((rows - 1) * p.stride_h + (p.r - 1) * p.dil_h + 1) * (p.w + p.pad_left + p.pad_right) * p.c * \
        p.dtype.itemsize
    while rows > 1 and row_bytes > tuning.value("tiled.band_bytes"):
        rows = (rows + 1) // 2
        row_bytes //= 2
    return rows


def _imbalance(p, kbg, kbs, rows, threads):
    """The busiest thread's share of the work over the mean, for tasks ordered (image, row band,
    group x channel blocks) and split into one contiguous range per thread (numbaconv.cpu._launch)."""
    inner = p.groups * -(-kbg // kbs)
    bands = -(-p.ho // rows)
    if p.n * bands * inner > 1 << 14:
        return 1.0  # (so many tasks that any split is even)
    work = [min(rows, p.ho - b * rows) * min(kbs, kbg - (j % -(-kbg // kbs)) * kbs)
            for _ in range(p.n) for b in range(bands) for j in range(inner)]
    parts = min(threads, len(work))
    loads = [sum(work[len(work) * i // parts:len(work) * (i + 1) // parts]) for i in range(parts)]
    return max(loads) * parts / max(1, sum(loads))


def generic(p):
    """Whether :func:`bind` runs ``p`` on the micro-kernel driver (the path :func:`plan` and the
    tuning knobs shape), not on the depthwise, streaming, deep-NCHW or direct-loop kernels."""
    return route(p) == "generic"


def _oversized(p):
    item = p.dtype.itemsize
    padded = p.n * (p.h + p.pad_top + p.pad_bottom) * (p.w + p.pad_left + p.pad_right) * p.c * item
    return padded > (p.n * p.c * p.h * p.w + p.n * p.k * p.ho * p.wo) * item + PADDED_SLACK_BYTES


def uses_streaming(p):
    """Too few output channels per group to fill the micro-kernel's ``V`` lanes (< 1/4 used)
    -- and, where the narrow blocks run such layers (AVX-512, AVX2), too short a reduction per
    output for them (under :data:`STREAM_MAX_REDUCTION` products: RGB inputs), or one or two
    output channels per group (:data:`STREAM_MAX_KG`), which use 1-2 of a narrow block's
    16 lanes."""
    if 4 * p.kg > block_width(p.dtype):
        return False
    if not narrow_blocks(p.dtype, p.kg, p.groups):
        return True
    products = p.cg * p.r * p.s
    if products < STREAM_MAX_REDUCTION or p.kg == 1:
        return True
    return p.kg <= STREAM_MAX_KG and (p.layout == "NCHW" or products < 4 * STREAM_MAX_REDUCTION)


#: products per output (C/G x R x S) from which layers with few output channels per group run
#: on the narrow register blocks rather than the streaming kernel, where narrow blocks exist.
#: Intel Xeon, 2 threads, float32, ms (streaming -> narrow blocks, NCHW / NHWC): 3x3 with 12
#: groups of 8 at 56x56 2.42 -> 0.68 / 4.34 -> 0.65, 32 groups of 4 1.69 -> 1.04 / 3.12 ->
#: 1.02, 64 -> 8 channels 1.56 -> 0.37 / 2.88 -> 0.33, 8 -> 8 at batch 8 1.82 -> 0.60 / 3.28 ->
#: 0.50; but RGB inputs stream faster: the seed notebook's 3 -> 3 (27 products) 9.5 vs 33.9
#: / 11.4 vs 29.6, 3 -> 4 at 224x224 0.26 vs 0.45 / 0.42 vs 0.40
STREAM_MAX_REDUCTION = 32

#: output channels per group that stream whatever the reduction (where narrow blocks exist;
#: NHWC: under 4 x STREAM_MAX_REDUCTION products).  Intel Xeon, 2 threads, float32, ms
#: (narrow blocks -> streaming, NCHW / NHWC): one channel 7x7 at 512x512 2.65 -> 0.47 / 2.31
#: -> 0.55, 9x9 3.79 -> 0.63 / 3.50 -> 0.74, RGB -> 1 7x7 5.80 -> 1.42 / 5.50 -> 1.69; two
#: channels 1 -> 2 7x7 4.19 -> 0.91 / 2.37 -> 1.09, 8 -> 2 3x3 at 256 0.84 -> 0.36 / 0.77 ->
#: 0.61, 16 -> 2 3x3 at 128 0.39 -> 0.28 / 0.37 -> 0.48 (NHWC: the blocks); four channels
#: mostly run faster on the blocks (16 -> 4 3x3 0.41 vs 0.53 / 0.38 vs 0.90)
STREAM_MAX_KG = 2


#: largest one-block footprint (R * S * C/G rows of V weights) that NHWC reads from HWIO weights
#: in place; larger layers pack (see bind) unless all their weights are under
#: :data:`HWIO_SMALL_BYTES`: float32 1x1 layers up to 256 input channels per group read in
#: place, 3x3 ones up to 28
HWIO_INPLACE_BLOCK_BYTES = 16 << 10

#: how much larger than input + result the zero-padded copies (tiled's NHWC copy, dot's
#: planes) may be before :func:`run` hands the layer to the direct loop
PADDED_SLACK_BYTES = 32 << 20

#: weight layout :func:`run` takes per activation layout (the front door converts to it)
WEIGHT_LAYOUTS = (("NCHW", "OIHW"), ("NHWC", "HWIO"))
_WEIGHT_LAYOUT = dict(WEIGHT_LAYOUTS)


#: ``run`` takes ``epi=`` and applies it in its kernels' stores (numbaconv.cpu.epilogue)
FUSES_EPILOGUE = True


def run(p, x, w, bias, out, epi=NONE):
    """``w`` is OIHW for NCHW and HWIO for NHWC (see :data:`WEIGHT_LAYOUTS`); ``epi``: the
    fused epilogue (:class:`numbaconv.cpu.epilogue.Epilogue`)."""
    bind(p, w, bias)(x, out, epi)


@functools.lru_cache(maxsize=1024)
def _layer(p, threads, _generation, prepared=False):
    """:func:`bind`'s decisions that depend on the problem alone (and the thread count, tuning
    knobs and whether the weights are prepared once), once per problem: ``conv2d`` binds on
    every call, and on a 1 ms layer these decisions cost ~5 % of it.  ``(kind, ...)``; for the micro-kernel path
    ``("generic", p, plan, in_place, padded_shape, pad_args, geometry, jobs)`` with ``p``
    rewritten for a strided 1x1 layer.  (Tests that patch the planners or thresholds clear
    it: tests/conftest.py.)"""
    if p.is_depthwise:
        return ("depthwise",)
    if pointwise.applies(p):
        # before streaming: its vectors run along pixels, so few output channels waste no lanes
        # (64 -> 5-8 channels at 56x56 ran 7-15x faster than streaming; Intel Xeon, AVX-512);
        # before dot: as fast on its deep 7x7 1x1 layers, one kernel less
        return ("pointwise",)
    if uses_streaming(p):
        return ("streaming",)
    if _oversized(p):
        return ("naive",)
    if dot.applies(p) and not prepared:
        # (a plan packs its weights once: then the packed blocks are faster here too -- res5
        # NCHW, Zen 3, Conv2dPlan: 1.18x onnxruntime's time packed, 1.38x through dot; batch 8
        # 1.20x / 1.36x; ResNet-50's 1x1 1024 -> 2048 stride 2 1.04x / 1.47x)
        return ("dot",)
    nchw = p.layout == "NCHW"
    flat = flat_rows(p)
    if flat:  # an R x 1 kernel on short rows: all the rows as one (see flat_rows)
        p = dataclasses.replace(p, h=1, w=p.h * p.w, r=1, s=p.r, pad_top=0, pad_bottom=0, pad_left=p.pad_top * p.w,
                                pad_right=p.pad_bottom * p.w, dil_h=1, dil_w=p.dil_h * p.w)
    ssh = ssw = 1
    if p.r == 1 and p.s == 1 and not p.has_padding and (p.stride_h > 1 or p.stride_w > 1):
        # strided 1x1: only every stride-th pixel is read -- copy just those, then stride 1
        ssh, ssw = p.stride_h, p.stride_w
        p = dataclasses.replace(p, h=p.ho, w=p.wo, stride_h=1, stride_w=1)
    m = group_pack(p.dtype, p.groups, p.cg, p.kg)
    k_ = p.k
    if m > 1:  # sets of m groups share one register: the kernels see G/m groups of m * C/G channels
        sets = -(-p.groups // m)  # (a partial last set: zero channels in the copy, its outputs clipped)
        p = dataclasses.replace(p, groups=sets, c=sets * m * p.cg, k=sets * m * p.kg)
    b = plan(p, m)
    in_place = m == 1 and not nchw and ssh == ssw == 1 and b["hp"] == p.h and b["wp"] == p.w
    padded_shape = (p.n, b["hp"], b["wp"], p.c)
    pad_args = (nchw, p.pad_top, p.pad_left, p.h, p.w, ssh, ssw)
    geometry = (p.n, p.ho, p.wo, b["hp"], b["wp"], p.c, k_, p.groups, p.cg, p.kg, b["kbg"], p.r, p.s, p.stride_h,
                p.stride_w, p.dil_h, p.dil_w, b["cb"], b["rows"], b["kbs"], nchw, p.dtype.type(0), b["hwio"], b["P"],
                b["split"], p.pad_top, p.h)
    jobs = p.n * -(-p.ho // b["rows"]) * p.groups * -(-b["kbg"] // b["kbs"])
    return ("generic", p, b, in_place, padded_shape, pad_args, geometry, jobs, flat)


def flat_rows(p):
    """Whether ``p``, an ``R x 1`` kernel at stride 1 with no column padding, runs as one row
    of all its ``Ho * W`` output pixels: output pixel ``q = i*W + j`` reads input ``q + r*W``
    (a ``1 x R`` kernel of dilation ``W`` over the flattened rows, the row padding as
    ``pad * W`` columns), so the register blocks run on without a partial block at each row's
    end.  Where a row's cover wastes 10 % more than the flat row's: Inception's 7x1 layers on
    17-pixel rows (three blocks of 7 for 17 pixels) 0.33 -> 0.27 ms NCHW, 0.31 -> 0.26 NHWC
    (128 channels; batch 8: 2.2 -> 1.8 ms; Intel Xeon, Conv2dPlan); a 3x1 layer on 28-pixel
    rows (no waste to remove) ran 40 % slower flattened."""
    if not (p.s == 1 and p.r > 1 and p.stride_h == 1 and p.stride_w == 1 and p.pad_left == 0
            and p.pad_right == 0 and p.ho > 1):
        return False
    pixels = p.ho * p.wo
    return row_cost(p.wo) / p.wo > 1.1 * row_cost(pixels) / pixels


def route(p, prepared=False):
    """Which of tiled's kernels runs ``p`` (``prepared``: for a plan's weights, see :func:`bind`):
    ``"generic"`` (the micro-kernels), ``"pointwise"``, ``"dot"``, ``"depthwise"``,
    ``"streaming"`` or ``"naive"`` (for numbaconv.ahead's families)."""
    return _layer(p, numba.get_num_threads(), tuning.generation(), prepared)[0]


def bind(p, w, bias, prepared=False):
    """:func:`run`'s decisions and prepared weights for problem ``p``, as a function of
    ``(x, out, epi)`` (a :class:`numbaconv.Conv2dPlan` keeps it per input shape: a call is
    then the allocation of the padded copy and the two kernel calls; ``prepared``: the plan's
    binding, which keeps what it prepares, so no kernel needs to avoid preparing weights)."""
    wlayout = _WEIGHT_LAYOUT[p.layout]
    layer = _layer(p, numba.get_num_threads(), tuning.generation(), prepared)
    kind = layer[0]
    if kind == "depthwise":
        return depthwise.bind(p, w, bias, wlayout)
    if kind == "streaming":
        w_oihw = w if wlayout == "OIHW" else np.ascontiguousarray(w.transpose(3, 2, 0, 1))
        return after(lambda x, out: depthwise.run_streaming(p, x, w_oihw, bias, out))
    if kind == "naive":
        # padding and dilation far beyond the image (what the front door's compaction leaves):
        # the zero-padded copy would outgrow the input and the result together, so the direct
        # loop, which clips the padding in place, runs instead (memory never grows with padding)
        return after(lambda x, out: naive.run(p, x, w, bias, out))
    if kind == "dot":
        return lambda x, out, epi: dot.run(p, x, w, bias, out, epi)  # deep NCHW: OIHW weights read in place
    if kind == "pointwise":
        return pointwise.bind(p, w, bias)  # NCHW 1x1: the input is the GEMM's matrix, read in place
    _, p, b, in_place, padded_shape, pad_args, geometry, jobs, flat = layer
    v_ = b["V"]
    # HWIO weights whose channel blocks are whole are read in place when K is small: each
    # (tap, input channel) row holds the V weights of a block contiguously, as packing would
    # (only further apart), so no pack and no packed-weight cache (whose exact check reads the
    # weights twice).  From K * itemsize = 1 KiB on, the block's rows are 1 KiB+ apart: they
    # fall into few cache sets and defeat the stride prefetcher (one line per row), and the
    # packed copy wins even with its check (Zen 1, NHWC: res5 3x3 8.4 -> 5.2 ms, ResNet-50's
    # 1x1 512->2048 at 7x7 3.7 -> 2.4 ms, 3x3 s2 256->512 4.3 -> 2.9 ms, res4 3x3 5.4 -> 4.5).
    # (The 1 KiB is the tuning knob ``tiled.hwio_inplace_bytes``: plan(p)["hwio"].)  And only
    # while a block's rows are few (HWIO_INPLACE_BLOCK_BYTES): rows K * itemsize apart share a
    # few sets of each 4 KiB page, so whether a block's rows fit in L2 at all depends on where
    # the weights' pages happen to lie in physical memory: on Zen 1, 1-2 of every 6 weight
    # arrays of a 3x3 128-channel layer ran 25-30 % slower, for as long as they lived, and a
    # Conv2dPlan's private copy drew the same lottery.  The packed copy is contiguous.
    w = np.ascontiguousarray(w)
    flat_shape = None
    if flat:  # (R, 1) taps as (1, R), the input's rows as one: views of the same memory
        w = w.reshape(w.shape[0], w.shape[1], 1, p.s) if wlayout == "OIHW" else w.reshape(1, p.s, *w.shape[2:])
        flat_shape = (p.n, p.c, 1, p.w) if p.layout == "NCHW" else (p.n, 1, p.w, p.c)
    m = b["m"]
    wpk = w.reshape(-1) if b["hwio"] else packed_weights(w, wlayout, p.groups, b["kbg"], b["cb"], v_, m)
    bp = np.zeros(p.k + v_, dtype=p.dtype)
    if bias is not None:
        bp[:bias.shape[0]] = bias  # (p.k may count a partial group set's missing channels)
    driver = _driver(p.dtype, b["nv"], m)
    dtype = p.dtype
    pixels = padded_shape[0] * padded_shape[1] * padded_shape[2]

    def call(x, out, epi):
        if flat_shape is not None:
            x = x.reshape(flat_shape)
        if in_place:
            xp = x  # NHWC without padding or overhang: the input is already the kernel's layout
        else:
            xp = np.empty(padded_shape, dtype=dtype)
            _pad_to_nhwc(x, xp, *pad_args)
            if m > 1:
                xpf = xp.reshape(-1)
                _INTERLEAVE[m].run((type_key(xpf),), pixels, xpf, p.c)
        of = out.reshape(-1)
        ea = epi.kernel_arg(of)
        xf = xp.reshape(-1)
        # (the weights, bias and geometry keep their types for the layer: only these vary)
        driver.run((type_key(xf), type_key(of), arg_key(ea)), jobs, xf, wpk, bp, of, *geometry, ea)
    return call


# --- code generation -----------------------------------------------------------------------
_HEADER = '''"""GENERATED by ``python -m numbaconv.cpu.tiled`` -- do not edit (see numbaconv/cpu/tiled.py).

Register-blocked micro-kernels of the ``tiled`` algorithm and their task functions.
``ukP_V`` computes a block of ``P`` output pixels x ``V`` output channels in explicit vector
registers (``_blockP_V``, see numbaconv/cpu/_vec.py) while it streams input channels and
kernel taps, then stores it (bias on the first channel block).  ``tasks_V_TAG`` sweeps a
range of the convolution's tasks with it (run in parallel by ``numbaconv.cpu._launch.Task``);
``pointwise_V_TAG`` the tasks of an NCHW 1x1 layer (numbaconv/cpu/pointwise.py).
"""

import numpy as np

from ._blocking import transpose_block
from ._jit import copy_run, jit, scratch, zero_run
from ._vec import conv_block, prefetchw, scatter_block
from .epilogue import finish_2d

# contract only: FMA in the stores, no reassociation
_ukjit = jit(fastmath={"contract"})


@_ukjit
def _scatter(of, tmp, ob, os_p, bias, kb0, nk, np_, first, vw):
    """of[ob + p*os_p + v] (= bias +|+=) tmp[p*vw + v] for p < np_, v < nk: the stores of a
    partial block, which the block does not make itself, shared by every micro-kernel (one
    compile, not one per pixel block; scalar: see numbaconv.cpu._vec.scatter_block)."""
    scatter_block(of, tmp, ob, os_p, bias, kb0, nk, np_, first, vw)
'''

_DRIVER = '''

@_ukjit
def tasks_{SUFFIX}_{TAG}(lo, hi, xf, wf, bias, of, n_, ho_, wo_, hp, wp, c_, k_, groups, cg, kg, kbg, r_, s_, sh, sw,
             dh, dw, cb, rows, kbs, nchw, zero, hwio, p_, split, pt, ih, epi):
    """Tasks ``[lo, hi)`` of the convolution.  A task: output rows [i0, i1) x channel blocks
    [kb_lo, kb_hi) (of {V}) of group g, image n, in blocks of ``p_`` pixels up to pixel
    ``split`` of a row, then of {PMIN} (of {PS}: runtime choices, so every layer shares this
    code), then the epilogue ``epi`` (None, or see finish_2d) on that finished, still cached,
    part.  (One function with the task loop: each
    function level costs its own compile, link and emission of everything below it.)

    The channel-block loop is innermost: one input pixel block (in L1) serves every block.
    ``hwio``: ``wf`` is the caller's (R, S, C/G, K) weights, read in place (K/G a multiple
    of {V}); otherwise the packed blocks of :func:`numbaconv.cpu.tiled.packed_weights`.
    The input's own rows are the padded copy's ``[pt, pt + ih)``: kernel rows that read only
    padding rows are skipped."""
    nrb = (ho_ + rows - 1) // rows
    nkr = (kbg + kbs - 1) // kbs
    inner = groups * nkr
    tmp = scratch({PMAX} * {V}, of)  # (np.empty: see numbaconv.cpu._jit.scratch)
    # NCHW: a task's rows are computed channels-last into ``obuf`` (whole blocks stored by the
    # block itself as vectors) and transposed into the output planes once they are finished
    # (8 x 8 register transposes: the blocks' per-pixel results scattered to the planes one
    # value at a time cost the 7x7 RGB stem ~0.3 ms on Intel Xeon)
    obuf = scratch(rows * wo_ * kbs * {V} if nchw else 1, of)
    dst = obuf if nchw else of
    os_p = {V} if nchw else k_  # (pixels apart in the rows the blocks write; channels adjacent)
    for t in range(lo, hi):
        n = t // (nrb * inner)
        rest = t % (nrb * inner)
        gk = rest % inner
        i0 = (rest // inner) * rows
        i1 = min(i0 + rows, ho_)
        g = gk // nkr
        kb_lo = (gk % nkr) * kbs
        kb_hi = min(kbg, kb_lo + kbs)
        for c0 in range(0, cg, cb):
            cl = min(cb, cg - c0)
            for i in range(i0, i1):
                # kernel rows [r_lo, r_hi) read the image; the others only zero padding: skipped
                # (as oneDNN does: 4-5 % of the work of 5x5 at 28x28 and 3x3 at 14x14, 3-4 % of
                # their time on Intel Xeon; res5's 7x7 4 %, dilated 3x3 at 28x28 4 %)
                top = i * sh - pt
                r_lo = 0 if top >= 0 else min(r_, (dh - 1 - top) // dh)
                r_hi = max(r_lo, min(r_, (ih - top + dh - 1) // dh))
                xrow = (n * hp + i * sh + r_lo * dh) * wp * c_ + g * cg + c0
                j0 = 0
                while j0 < wo_:
                    pb = p_ if j0 < split else {PMIN}
                    for kb in range(kb_lo, kb_hi):
                        nk = min({V}, kg - kb * {V}{CLIP})
                        kb0 = g * kg + kb * {V}
                        if hwio:
                            ws_c = k_
                            ws_t = cg * k_
                            wb = c0 * k_ + kb0 + r_lo * s_ * ws_t
                        else:
                            ws_c = {V}
                            ws_t = {CLW} * {V}
                            wb = ((g * kbg + kb) * r_ * s_ * {CGW} + {C0W} * r_ * s_) * {V} + r_lo * s_ * ws_t
                        if nchw:
                            orow = ((kb - kb_lo) * rows + i - i0) * wo_ * {V}
                        else:
                            orow = (n * ho_ + i) * wo_ * k_ + kb0
                        xb = xrow + j0 * sw * c_
                        ob = orow + j0 * os_p
                        np_ = min(pb, wo_ - j0)
{CALLS}
                    j0 += pb
        if nchw:
            for kb in range(kb_lo, kb_hi):
                nk = min({V}, kg - kb * {V}{CLIP})
                transpose_block(obuf, of, (kb - kb_lo) * rows * wo_ * {V}, {V},
                                (n * k_ + g * kg + kb * {V}) * ho_ * wo_ + i0 * wo_, ho_ * wo_, (i1 - i0) * wo_, nk)
        if epi is not None:  # (pruned at compile time without an epilogue)
            # the task's channels [k_lo, k_hi) of rows [i0, i1): in NCHW one run per channel
            # (its rows adjacent in the plane), in NHWC one per pixel (the rows' pixels
            # adjacent), or a single run when the task has every channel
            k_lo = g * kg + kb_lo * {V}
            nk = min(kb_hi * {V}, kg{CLIPK}) - kb_lo * {V}
            if nchw:
                finish_2d(of, epi, (n * k_ + k_lo) * ho_ * wo_ + i0 * wo_, nk, ho_ * wo_, (i1 - i0) * wo_)
            elif nk == k_:
                finish_2d(of, epi, (n * ho_ + i0) * wo_ * k_, 1, 0, (i1 - i0) * wo_ * k_)
            else:
                finish_2d(of, epi, (n * ho_ + i0) * wo_ * k_ + k_lo, (i1 - i0) * wo_, k_, nk)
'''


_POINTWISE = '''

@_ukjit
def pointwise_{V}_{TAG}(lo, hi, wf, xf, of, bias, kstarts, c_, k_, hw, nqb, qbs, nqc, kbs, cb, zero, epi):
    \"\"\"Tasks ``[lo, hi)`` of an NCHW 1x1 convolution (:mod:`numbaconv.cpu.pointwise`): the
    register block with its roles swapped -- output channels broadcast from the OIHW weight
    rows ``wf`` (its "pixels"), {V} output pixels loaded as vectors from the input's channel
    planes ``xf`` (its "channels"), each row stored as vectors in place with its bias
    (``bias``: one per weight row).  A task: image n, pixel blocks [qb_lo, qb_hi) of {V},
    channel blocks [kb_lo, kb_hi) (rows ``kstarts[kb]`` up to the next start: {PS}), input
    channels in blocks of ``cb`` (one block's {V} columns stay in L1 for every channel block,
    later ones added into the output); then the epilogue ``epi`` on that finished, still
    cached, part.  A row's last pixel block, when partial, is computed on the {V} pixels that
    end the plane -- overlapping the block before it, read in place -- and only its own
    pixels are stored; planes under {V} pixels read a zero-padded copy of their columns.\"\"\"
    nkb = kstarts.size - 1
    nkc = (nkb + kbs - 1) // kbs
    tmp = scratch({PMAX} * {V}, of)
    panel = scratch(c_ * {V}, of)
    for t in range(lo, hi):
        n = t // (nqc * nkc)
        rest = t % (nqc * nkc)
        qb_lo = (rest // nkc) * qbs
        qb_hi = min(nqb, qb_lo + qbs)
        kb_lo = (rest % nkc) * kbs
        kb_hi = min(nkb, kb_lo + kbs)
        for qb in range(qb_lo, qb_hi):
            q0 = qb * {V}
            nq = min({V}, hw - q0)
            src = xf
            wb = n * c_ * hw + q0
            ws_c = hw
            if nq < {V} and hw >= {V}:  # (the plane's last {V} pixels in place: no copy of the columns)
                wb -= {V} - nq
            elif nq < {V}:
                for c in range(c_):
                    copy_run(panel, c * {V}, xf, wb + c * hw, nq)
                    zero_run(panel, c * {V} + nq, {V} - nq)
                src = panel
                wb = 0
                ws_c = {V}
            for c0 in range(0, c_, cb):
                cl = min(cb, c_ - c0)
                for kb in range(kb_lo, kb_hi):
                    k0 = kstarts[kb]
                    pb = kstarts[kb + 1] - k0
                    np_ = min(pb, k_ - k0)
                    ob = (n * k_ + k0) * hw + q0
                    whole = nq == {V} and np_ == pb
                    for p in range(np_):
                        prefetchw(of, ob + p * hw)
                        prefetchw(of, ob + p * hw + nq - 1)
                    mode = 0
                    if whole:
                        mode = 1 if c0 == 0 else 2
{CALLS}
                    if not whole:  # (from tmp; derived here, not kept live across the block's loop)
                        sh = {V} - nq if hw >= {V} else 0  # (the lane of the block's first pixel)
                        for p in range(np_):
                            o = ob + p * hw
                            t0 = p * {V} + sh
                            if c0 == 0:
                                b = bias[k0 + p]
                                for j in range(nq):
                                    of[o + j] = tmp[t0 + j] + b
                            else:
                                for j in range(nq):
                                    of[o + j] += tmp[t0 + j]
        if epi is not None:  # (pruned at compile time without an epilogue)
            k_lo = kstarts[kb_lo]
            q_lo = qb_lo * {V}
            finish_2d(of, epi, (n * k_ + k_lo) * hw + q_lo, min(k_, kstarts[kb_hi]) - k_lo, hw,
                      min(hw, qb_hi * {V}) - q_lo)
'''


def _on_block_size(ps, indent, call):
    """Source lines running ``call(p_)`` (its lines, indented one level more) for the block
    size ``pb`` in ``ps``: an if / elif / else chain, the smallest size last (the lines alone,
    one level less, for a single size)."""
    lines = []
    for i, p_ in enumerate(sorted(ps, reverse=True)):
        if i == len(ps) - 1:
            lines.append(f"{indent}else:")
        else:
            lines.append(f"{indent}{'if' if i == 0 else 'elif'} pb == {p_}:")
        lines += [f"{indent}    {line}" for line in call(p_)]
    if len(ps) == 1:
        lines = [line[4:] for line in lines[1:]]
    return "\n".join(lines)


def _gen_pointwise(v_, ps, nv, m):
    calls = _on_block_size(ps, " " * 20, lambda p_: [
        f"_rows{p_}_{v_}(wf, src, tmp, k0 * c_ + c0, wb + c0 * ws_c, 1, 1, 0, 0, c_, ws_c, 0,",
        "           cl, of, ob, hw, bias, k0, mode)"])
    blocks = "".join(f"\n\n_rows{p_}_{v_} = conv_block({p_}, 2, {v_ // 2}, row_bias=True)" for p_ in sorted(ps))
    return blocks + "\n" + _POINTWISE.format(V=v_, TAG=driver_tag(ps), PS=" or ".join(map(str, sorted(ps))),
                                              PMAX=max(ps), CALLS=calls)


def _gen_driver(v_, ps, nv, m):
    sfx = kernel_suffix(v_, nv, m)
    calls = _on_block_size(ps, " " * 24, lambda p_: [
        f"uk{p_}_{sfx}(xf, wf, dst, xb, wb, ob, cl, r_hi - r_lo, s_, dh * wp * c_, dw * c_, sw * c_, os_p,",
        "         bias, kb0, nk, np_, c0 == 0, zero, tmp, ws_c, ws_t)"])
    # (m > 1: channel counts and offsets in the input count each set's m-tuples; the packed
    # weights hold one row of V per tuple)
    w_units = {name: name if m == 1 else f"({name} // {m})" for name in ("cg", "c0", "cl")}
    return _DRIVER.format(V=v_, SUFFIX=sfx, TAG=driver_tag(ps), PS=tuple(sorted(ps)), PMAX=max(ps), PMIN=min(ps),
                          CALLS=calls, CGW=w_units["cg"], C0W=w_units["c0"], CLW=w_units["cl"],
                          CLIP="" if m == 1 else f", k_ - g * kg - kb * {v_}",  # (a partial last set)
                          CLIPK="" if m == 1 else ", k_ - g * kg")


def _gen_ukernel(p_, v_, nv, m):
    sfx = kernel_suffix(v_, nv, m)
    L = ["", "", f"_block{p_}_{sfx} = conv_block({p_}, {nv}, {v_ // nv}{f', m={m}' if m > 1 else ''})", "", "",
         "@_ukjit",
         f"def uk{p_}_{sfx}(xf, wf, of, xb, wb, ob, cin, r_, s_, xs_r, xs_s, xs_p, os_p, bias, kb0, nk, np_,",
         "           first, zero, tmp, ws_c, ws_t):",
         f'    """{p_} pixels x {v_} channels ({nv} registers): of[ob + p*os_p + v] (= bias +|+=) sum x * w."""']
    L.append("    for p in range(np_):")
    L.append("        prefetchw(of, ob + p * os_p)")
    L.append(f"        prefetchw(of, ob + p * os_p + {v_ - 1})")
    # The output rows are channels-last (the caller's NHWC output, or an NCHW task's buffer): a
    # whole block is stored by the block itself (vector adds, bias on the first channel
    # block); a partial one comes back in ``tmp`` in (pixel, channel) order for _scatter.
    L.append("    mode = 0")
    L.append(f"    if nk == {v_} and np_ == {p_}:")
    L.append(f"        mode = 1 if first else 2")
    L.append(f"    _block{p_}_{sfx}(xf, wf, tmp, xb, wb, r_, s_, xs_r, xs_s, xs_p, ws_c, ws_t, cin, of, ob, os_p, bias, kb0,")
    L.append("                  mode)")
    L.append("    if mode == 0:")
    L.append(f"        _scatter(of, tmp, ob, os_p, bias, kb0, nk, np_, first, np.int64({v_}))")
    return "\n".join(L) + "\n"


def generate_source():
    """The text of :mod:`numbaconv.cpu._ukernels`."""
    return (_HEADER + "".join(_gen_ukernel(*shape) for shape in _UK_SHAPES)
            + "".join(_gen_driver(*d) for d in _DRIVERS)
            + "".join(_gen_pointwise(v_, ps, 2, 1) for v_, ps in _POINTWISE_DRIVERS))  # (NCHW 1x1: 2 per pixel)


if __name__ == "__main__":
    import pathlib
    path = pathlib.Path(__file__).with_name("_ukernels.py")
    path.write_text(generate_source())
    print(f"wrote {path}")
