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
keeps ``P = 6`` output pixels x ``V`` output channels in registers -- ``V = 2`` vectors:
16 float32 / 8 float64 on AVX2 (12 ymm accumulators, like oneDNN's avx2 kernel) and
32 / 16 on AVX-512 machines (12 zmm accumulators).  For every input channel and tap it
loads ``V`` weights (2 vector loads) and broadcasts ``P`` input values: 2P FMAs per
``2 + P`` loads.  Cache blocking: input channels in blocks of ``cb`` so the packed
weights of one block (``R*S*cb*V`` values) stay in L2 while a band of output rows is
swept; partial sums of later channel blocks are added into the output.  Work is split
with ``prange`` over (batch x output-row bands x groups x output-channel blocks), so
batch 1 uses every core.

Why generated scalar code: Numba has no vector type.  ``P*V`` scalar accumulators with
unit-stride weight loads are packed into vector registers by LLVM's SLP vectoriser --
which Numba leaves off by default (``NUMBA_SLP_VECTORIZE=0``), so :func:`_slp` turns it
on while these kernels compile.  The kernels use ``fastmath={"contract"}`` only: FMA
contraction, but no reassociation, so the loop vectoriser cannot turn the channel loop
into a gather-based reduction instead.  ``tests/test_tiled.py`` checks the machine code
for packed FMAs.

Depthwise convolutions (``groups == C``) go to :mod:`numbaconv.cpu.depthwise`; few-channel,
memory-bound problems (``K/G`` much smaller than ``V``) to the streaming kernels there too;
deep NCHW layers with few output pixels and large weights (ResNet's res5) to
:mod:`numbaconv.cpu.dot`, which reads the OIHW weights in place instead of packing them.

Regenerate :mod:`numbaconv.cpu._ukernels` with ``python -m numbaconv.cpu.tiled``.
"""

import dataclasses
import functools
import threading

import llvmlite.binding as ll
import numba
import numpy as np
from numba import prange
from numba.core import config as _numba_config

from . import depthwise, dot
from ._jit import jit, pjit, slp as _slp

__all__ = ["run", "plan", "packed_weights", "clear_cache", "WEIGHT_LAYOUTS", "microkernel", "microkernel_asm", "generate_source", "P"]

#: output pixels per micro-kernel call that fit the register file: 2P accumulators +
#: 2 weight vectors + a broadcast in 16 ymm (AVX2) or 32 zmm (AVX-512) registers
P_CHOICES = {32: (4, 5, 6), 64: (6, 7, 8)}
P = 6  # the default (and the one asm-checked)
_UK_SHAPES = tuple(sorted({(p_, 2 * vb // item) for vb, ps in P_CHOICES.items() for p_ in ps
                           for item in (4, 8)}))


@functools.lru_cache(maxsize=None)
def vector_bytes():
    """SIMD register width Numba compiles for on this machine: 64 (AVX-512), 32 (AVX2) or 16."""
    name = _numba_config.CPU_NAME or ll.get_host_cpu_name()
    if name in ("generic", "host") and _numba_config.CPU_NAME:
        return 16
    feats = ll.get_host_cpu_features()
    if feats.get("avx512f", False):
        return 64
    if feats.get("avx", False) and feats.get("fma", False):
        return 32
    return 16


def block_width(dtype):
    """``V``: output channels per micro-kernel (two SIMD registers' worth, at least 8)."""
    return max(8, min(32, 2 * vector_bytes() // np.dtype(dtype).itemsize))


def microkernel(dtype, p_=P):
    from . import _ukernels
    return getattr(_ukernels, f"uk{p_}_{block_width(dtype)}")


def _driver(dtype, p_):
    from . import _ukernels
    return getattr(_ukernels, f"conv{p_}_{block_width(dtype)}")


def pixel_block(wo):
    """``P`` for output rows of ``wo`` pixels: least padded work, ~1.5 pixels' worth of
    fixed cost (weight loads, loop and store overhead) per micro-kernel call."""
    choices = P_CHOICES.get(vector_bytes(), (P,))
    return min(choices, key=lambda p_: (-(-wo // p_) * (p_ + 1.5), -p_))


def microkernel_asm(dtype=np.float32, p_=P):
    """Machine code of the ``p_``-pixel micro-kernel for ``dtype`` on this machine (compiled
    with SLP).  Compiled afresh (no cache: Numba cannot inspect code loaded from its cache).
    """
    uk = numba.njit(cache=False, nogil=True, fastmath={"contract"})(microkernel(dtype, p_).py_func)
    t = numba.from_dtype(np.dtype(dtype))
    a = t[::1]
    i = numba.intp
    sig = (a, a, a, i, i, i, i, i, i, i, i, i, i, i, a, i, i, i, numba.boolean, t, a, i, i)
    with _slp():
        uk.compile(sig)
    return uk.inspect_asm(sig)


# --- layout preparation ----------------------------------------------------------------------
@pjit
def _pad_to_nhwc(x, xp, nchw, pt, pl, h_, w_, ssh, ssw):
    """``xp[n, pt + i, pl + j, c] = x[n, c, i*ssh, j*ssw]`` (NCHW or NHWC source) for
    ``i < h_, j < w_``; every other entry 0.  ``ssh, ssw > 1`` subsample (strided 1x1)."""
    n_, hp, wp, c_ = xp.shape
    for job in prange(n_ * hp):
        n = job // hp
        i = job % hp
        h = i - pt
        if h < 0 or h >= h_:
            xp[n, i, :, :] = 0
            continue
        xp[n, i, :pl, :] = 0
        xp[n, i, pl + w_:, :] = 0
        if nchw:
            # blocks of 16 channels: 16 read streams, 64-byte contiguous writes
            for c0 in range(0, c_, 16):
                ce = min(16, c_ - c0)
                for w in range(w_):
                    for c in range(ce):
                        xp[n, i, pl + w, c0 + c] = x[n, c0 + c, h * ssh, w * ssw]
        elif ssw == 1:
            xp[n, i, pl:pl + w_, :] = x[n, h * ssh, :, :]
        else:
            for w in range(w_):
                xp[n, i, pl + w, :] = x[n, h * ssh, w * ssw, :]


@pjit
def _pack_weights(w, wp, groups, kbg, cb, v_):
    """OIHW ``w`` -> flat packed ``(G, KBg, C-blocks, R, S, cl, V)``; zero past ``K/G``."""
    k_, cg, r_, s_ = w.shape
    kg = k_ // groups
    for gk in prange(groups * kbg):
        g = gk // kbg
        kb = gk % kbg
        base = gk * r_ * s_ * cg * v_
        for c0 in range(0, cg, cb):
            cl = min(cb, cg - c0)
            boff = base + c0 * r_ * s_ * v_
            for r in range(r_):
                for s in range(s_):
                    for c in range(cl):
                        idx = boff + ((r * s_ + s) * cl + c) * v_
                        for v in range(v_):
                            kk = kb * v_ + v
                            if kk < kg:
                                wp[idx + v] = w[g * kg + kk, c0 + c, r, s]
                            else:
                                wp[idx + v] = 0

@pjit
def _pack_hwio(w, wp, groups, kbg, cb, v_):
    """HWIO ``w`` (R, S, C/G, K) -> the same packed layout.

    Reads ``w`` row by row (a row: the ``K`` outputs of one tap and input channel) and
    scatters each row's ``V``-runs to the ``K/V`` output-channel blocks: one sequential
    read stream, a handful of sequential write streams (strided patterns thrash the TLB).
    """
    r_, s_, cg, k_ = w.shape
    rs = r_ * s_
    kg = k_ // groups
    wf = w.reshape(-1)
    nblk = (cg + cb - 1) // cb
    for job in prange(nblk * rs):
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
                    wp[dst:dst + nk] = wf[s0:s0 + nk]  # slices: vectorised, no wraparound checks
                    wp[dst + nk:dst + v_] = 0


@jit
def _xor_or(a, b):
    """``a != b`` anywhere (bit views).  Zero-based loop: no negative-index wraparound
    checks, so it vectorises (a ``range(lo, hi)`` loop ran ten times slower)."""
    d = a[0] ^ b[0]
    for i in range(a.size):
        d |= a[i] ^ b[i]
    return d != 0


@pjit
def _bits_differ(a, b):
    """True when the unsigned-integer views ``a`` and ``b`` (same size >= 1) differ anywhere."""
    n = a.size
    nch = min(n, 64)
    chunk = (n + nch - 1) // nch
    nch = (n + chunk - 1) // chunk
    flags = np.zeros(nch, dtype=np.bool_)
    for t in prange(nch):
        lo = t * chunk
        hi = min(n, lo + chunk)
        flags[t] = _xor_or(a[lo:hi], b[lo:hi])
    return flags.any()


# --- packed-weight cache -------------------------------------------------------------------
#: weights at least this large (bytes) are cached packed; smaller ones are packed every call
CACHE_MIN_BYTES = 1 << 20
#: total bytes (kept copies + packed) the cache may hold; least recently used entries go first
CACHE_MAX_BYTES = 256 << 20
_cache = {}
_cache_lock = threading.Lock()
_cache_stats = {"hits": 0, "misses": 0}


def _as_bits(a):
    return a.reshape(-1).view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


def packed_weights(w, wlayout, groups, kbg, cb, v_):
    """Packed weights for ``w`` (C-contiguous, ``wlayout`` "OIHW" or "HWIO").

    Large weights are cached: an entry keeps a private copy of the weights it was packed
    from and is reused only when the new weights are bit-for-bit equal to that copy (checked
    on every call, in parallel: ~0.2-0.4 ms for ResNet's largest, 9.4 MB, weights), so an array changed in place or
    a new array with other values is always packed afresh.
    """
    key = (wlayout, w.shape, w.dtype.str, groups, kbg, cb, v_)
    big = w.nbytes >= CACHE_MIN_BYTES
    if big:
        with _cache_lock:
            entry = _cache.pop(key, None)
            if entry is not None:
                _cache[key] = entry  # most recently used last
        if entry is not None and not _bits_differ(_as_bits(w), _as_bits(entry[0])):
            _cache_stats["hits"] += 1
            return entry[1]
    r_, s_ = (w.shape[2], w.shape[3]) if wlayout == "OIHW" else (w.shape[0], w.shape[1])
    cg = w.shape[1] if wlayout == "OIHW" else w.shape[2]
    wpk = np.empty(groups * kbg * r_ * s_ * cg * v_, dtype=w.dtype)
    if wlayout == "OIHW":
        _pack_weights(w, wpk, groups, kbg, cb, v_)
    else:
        _pack_hwio(w, wpk, groups, kbg, cb, v_)
    if big:
        _cache_stats["misses"] += 1
        entry = (w.copy(), wpk)
        with _cache_lock:
            _cache.pop(key, None)
            _cache[key] = entry
            total = sum(e[0].nbytes + e[1].nbytes for e in _cache.values())
            while total > CACHE_MAX_BYTES and len(_cache) > 1:
                old = _cache.pop(next(iter(_cache)))
                total -= old[0].nbytes + old[1].nbytes
    return wpk


def clear_cache():
    """Forget every cached packed weight array."""
    with _cache_lock:
        _cache.clear()


# --- planning --------------------------------------------------------------------------------
def plan(p):
    """Blocking for problem ``p``: dict(P, V, cb, rows, kbg, hp, wp)."""
    v_ = block_width(p.dtype)
    p_ = pixel_block(p.wo)
    item = p.dtype.itemsize
    # Input-channel block: the packed weights of one block (R*S*cb*V) within ~128 KiB (L2).
    cb = max(8, (128 * 1024) // (p.r * p.s * v_ * item))
    cb = min(p.cg, cb)
    nblk = -(-p.cg // cb)
    cb = -(-p.cg // nblk)  # balance the blocks
    # Output-row bands: enough tasks for the threads, each band's input rows within ~L2.
    kbg = -(-p.kg // v_)
    threads = numba.get_num_threads()
    jobs_per_row = p.n * p.groups * kbg
    rows = p.ho
    while rows > 1 and jobs_per_row * (-(-p.ho // rows)) < 4 * threads:
        rows = (rows + 1) // 2
    row_bytes = ((rows - 1) * p.stride_h + (p.r - 1) * p.dil_h + 1) * (p.w + p.pad_left + p.pad_right) * p.c * item
    while rows > 1 and row_bytes > 512 * 1024:
        rows = (rows + 1) // 2
        row_bytes //= 2
    hp = p.h + p.pad_top + p.pad_bottom
    wblocks = -(-p.wo // p_)
    wp = max(p.w + p.pad_left + p.pad_right, (wblocks * p_ - 1) * p.stride_w + (p.s - 1) * p.dil_w + 1)
    return dict(P=p_, V=v_, cb=cb, rows=rows, kbg=kbg, kbs=1, hp=hp, wp=wp)


def uses_streaming(p):
    """Too few output channels per group to fill the micro-kernel's ``V`` lanes (< 1/4 used)."""
    return 4 * p.kg <= block_width(p.dtype)


#: weight layout :func:`run` takes per activation layout (the front door converts to it)
WEIGHT_LAYOUTS = (("NCHW", "OIHW"), ("NHWC", "HWIO"))
_WEIGHT_LAYOUT = dict(WEIGHT_LAYOUTS)


def run(p, x, w, bias, out):
    """``w`` is OIHW for NCHW and HWIO for NHWC (see :data:`WEIGHT_LAYOUTS`)."""
    wlayout = _WEIGHT_LAYOUT[p.layout]
    if p.is_depthwise or uses_streaming(p):
        if p.is_depthwise:
            return depthwise.run(p, x, w, bias, out, wlayout)
        w_oihw = w if wlayout == "OIHW" else np.ascontiguousarray(w.transpose(3, 2, 0, 1))
        return depthwise.run_streaming(p, x, w_oihw, bias, out)
    if dot.applies(p):
        return dot.run(p, x, w, bias, out)  # deep NCHW layer: its OIHW weights read in place
    nchw = p.layout == "NCHW"
    ssh = ssw = 1
    if p.r == 1 and p.s == 1 and not p.has_padding and (p.stride_h > 1 or p.stride_w > 1):
        # strided 1x1: only every stride-th pixel is read -- copy just those, then stride 1
        ssh, ssw = p.stride_h, p.stride_w
        p = dataclasses.replace(p, h=p.ho, w=p.wo, stride_h=1, stride_w=1)
    b = plan(p)
    v_ = b["V"]
    if not nchw and ssh == ssw == 1 and b["hp"] == p.h and b["wp"] == p.w:
        xp = x  # NHWC without padding or overhang: the input is already the kernel's layout
    else:
        xp = np.empty((p.n, b["hp"], b["wp"], p.c), dtype=p.dtype)
        _pad_to_nhwc(x, xp, nchw, p.pad_top, p.pad_left, p.h, p.w, ssh, ssw)
    # HWIO weights whose channel blocks are whole are read in place: each (tap, input channel)
    # row holds the V weights of a block contiguously, as packing would (only further apart),
    # so no pack and no packed-weight cache (whose exact check reads the weights twice:
    # 0.35 ms of res5's 1.6)
    hwio = wlayout == "HWIO" and p.kg % v_ == 0
    w = np.ascontiguousarray(w)
    wpk = w.reshape(-1) if hwio else packed_weights(w, wlayout, p.groups, b["kbg"], b["cb"], v_)
    bp = np.zeros(p.k + v_, dtype=p.dtype)
    if bias is not None:
        bp[:p.k] = bias
    with _slp():
        _driver(p.dtype, b["P"])(xp.ravel(), wpk, bp, out.reshape(-1), p.n, p.ho, p.wo, b["hp"], b["wp"], p.c,
                         p.k, p.groups, p.cg, p.kg, b["kbg"], p.r, p.s, p.stride_h, p.stride_w, p.dil_h,
                         p.dil_w, b["cb"], b["rows"], b["kbs"], nchw, p.dtype.type(0), hwio)


# --- code generation -----------------------------------------------------------------------
_HEADER = '''"""GENERATED by ``python -m numbaconv.cpu.tiled`` -- do not edit (see numbaconv/cpu/tiled.py).

Register-blocked micro-kernels of the ``tiled`` algorithm and their parallel drivers.
``ukP_V`` computes a block of ``P`` output pixels x ``V`` output channels held in ``P*V``
scalar locals that LLVM's SLP vectoriser packs into vector registers, while it streams
input channels and kernel taps.  ``convP_V`` sweeps the whole convolution with it.
"""

import numba
import numpy as np
from numba import prange

from ._jit import pjit, prefetchw

# contract only: FMA, but no reassociation (see numbaconv/cpu/tiled.py)
_ukjit = numba.njit(cache=True, nogil=True, fastmath={"contract"})
'''

_DRIVER = '''

@_ukjit
def tile{P}_{V}(xf, wf, of, tmp, n, i0, i1, g, kb_lo, kb_hi, ho_, wo_, hp, wp, c_, k_, cg, kg, kbg, r_, s_,
            sh, sw, dh, dw, cb, nchw, bias, zero, hwio):
    """Output rows [i0, i1) x channel blocks [kb_lo, kb_hi) (of {V}) of group g, image n.

    The channel-block loop is innermost: one input pixel block (in L1) serves every block.
    ``hwio``: ``wf`` is the caller's (R, S, C/G, K) weights, read in place (K/G a multiple
    of {V}); otherwise the packed blocks of :func:`numbaconv.cpu.tiled.packed_weights`."""
    if nchw:
        os_p = 1
        os_k = ho_ * wo_
    else:
        os_p = k_
        os_k = 1
    for c0 in range(0, cg, cb):
        cl = min(cb, cg - c0)
        for i in range(i0, i1):
            xrow = (n * hp + i * sh) * wp * c_ + g * cg + c0
            for j0 in range(0, wo_, {P}):
                for kb in range(kb_lo, kb_hi):
                    nk = min({V}, kg - kb * {V})
                    kb0 = g * kg + kb * {V}
                    if hwio:
                        wb = c0 * k_ + kb0
                        ws_c = k_
                        ws_t = cg * k_
                    else:
                        wb = ((g * kbg + kb) * r_ * s_ * cg + c0 * r_ * s_) * {V}
                        ws_c = {V}
                        ws_t = cl * {V}
                    if nchw:
                        orow = (n * k_ + kb0) * ho_ * wo_ + i * wo_
                    else:
                        orow = (n * ho_ + i) * wo_ * k_ + kb0
                    uk{P}_{V}(xf, wf, of, xrow + j0 * sw * c_, wb, orow + j0 * os_p, cl, r_, s_, dh * wp * c_,
                            dw * c_, sw * c_, os_p, os_k, bias, kb0, nk, min({P}, wo_ - j0), c0 == 0, zero, tmp,
                            ws_c, ws_t)


@pjit
def conv{P}_{V}(xf, wf, bias, of, n_, ho_, wo_, hp, wp, c_, k_, groups, cg, kg, kbg, r_, s_, sh, sw, dh, dw,
            cb, rows, kbs, nchw, zero, hwio):
    """The whole convolution: prange over (image, row band, group, run of kbs channel blocks)."""
    nrb = (ho_ + rows - 1) // rows
    nkr = (kbg + kbs - 1) // kbs
    inner = groups * nkr
    for t in prange(n_ * nrb * inner):
        tmp = np.empty({P} * {V}, dtype=of.dtype)
        n = t // (nrb * inner)
        rest = t % (nrb * inner)
        rb = rest // inner
        gk = rest % inner
        i0 = rb * rows
        kr = gk % nkr
        tile{P}_{V}(xf, wf, of, tmp, n, i0, min(i0 + rows, ho_), gk // nkr, kr * kbs, min(kbg, kr * kbs + kbs),
                  ho_, wo_, hp, wp, c_, k_, cg, kg, kbg, r_, s_, sh, sw, dh, dw, cb, nchw, bias, zero, hwio)
'''


def _gen_ukernel(p_, v_):
    a = lambda p, v: f"a{p}_{v}"  # noqa: E731
    L = ["", "", "@_ukjit",
         f"def uk{p_}_{v_}(xf, wf, of, xb, wb, ob, cin, r_, s_, xs_r, xs_s, xs_p, os_p, os_k, bias, kb0, nk, np_,",
         "           first, zero, tmp, ws_c, ws_t):",
         f'    """{p_} pixels x {v_} channels: of[ob + p*os_p + v*os_k] (= bias +|+=) sum x * w."""']
    for v in range(1, v_):
        L.append(f"    u{v} = np.uintp({v})")
    L.append("    xsp = np.uintp(xs_p)")
    for p in range(1, p_):
        L.append(f"    xp{p} = np.uintp({p}) * xsp")
    for p in range(p_):
        for v0 in range(0, v_, 8):
            L.append("    " + " = ".join(a(p, v) for v in range(v0, min(v_, v0 + 8))) + " = zero")
    L.append("    if os_k == 1:")
    L.append("        for p in range(np_):")
    L.append("            prefetchw(of, ob + p * os_p)")
    L.append(f"            prefetchw(of, ob + p * os_p + {v_ - 1})")
    L.append("    else:")
    L.append("        for v in range(nk):")
    L.append("            prefetchw(of, ob + v * os_k)")
    L.append("            prefetchw(of, ob + v * os_k + np_ - 1)")
    L.append("    for r in range(r_):")
    L.append("        for s in range(s_):")
    L.append("            xo = np.uintp(xb + r * xs_r + s * xs_s)")
    L.append("            wo = np.uintp(wb + (r * s_ + s) * ws_t)")
    L.append("            for c in range(np.uintp(cin)):")
    L.append("                wc = wo + c * np.uintp(ws_c)")
    L.append("                xc = xo + c")
    for v in range(v_):
        L.append(f"                w{v} = wf[wc + u{v}]" if v else f"                w{v} = wf[wc]")
    for p in range(p_):
        L.append(f"                x{p} = xf[xc + xp{p}]" if p else f"                x{p} = xf[xc]")
        for v in range(v_):
            L.append(f"                {a(p, v)} += x{p} * w{v}")
    # Full block: the accumulators go to ``tmp`` in their own (pixel, channel) order -- so
    # the SLP vectoriser keeps the loop's channel-vector grouping -- and are copied out with
    # zero-based loops over slices (vectorisable, no negative-index wraparound checks):
    # along channels in NHWC (os_k == 1), along pixels in NCHW (os_p == 1).
    for p in range(p_):
        for v0 in range(0, v_, 8):
            L.append("    " + "; ".join(f"tmp[{p * v_ + v}] = {a(p, v)}" for v in range(v0, min(v_, v0 + 8))))
    L.append(f"    if nk == {v_} and np_ == {p_}:")
    L.append(f"        bb = bias[kb0:kb0 + {v_}]")
    L.append("        if os_k == 1:")
    L.append(f"            for p in range({p_}):")
    L.append(f"                dst = of[ob + p * os_p:ob + p * os_p + {v_}]")
    L.append(f"                src = tmp[p * {v_}:p * {v_} + {v_}]")
    L.append("                if first:")
    L.append(f"                    for v in range({v_}):")
    L.append("                        dst[v] = src[v] + bb[v]")
    L.append("                else:")
    L.append(f"                    for v in range({v_}):")
    L.append("                        dst[v] += src[v]")
    L.append("        else:")
    L.append(f"            for v in range({v_}):")
    L.append(f"                dst = of[ob + v * os_k:ob + v * os_k + {p_}]")
    L.append("                if first:")
    L.append("                    bv = bb[v]")
    L.append(f"                    for p in range({p_}):")
    L.append(f"                        dst[p] = tmp[p * {v_} + v] + bv")
    L.append("                else:")
    L.append(f"                    for p in range({p_}):")
    L.append(f"                        dst[p] += tmp[p * {v_} + v]")
    L.append("    else:")
    L.append("        for p in range(np_):")
    L.append("            for v in range(nk):")
    L.append("                o = ob + p * os_p + v * os_k")
    L.append("                if first:")
    L.append(f"                    of[o] = tmp[p * {v_} + v] + bias[kb0 + v]")
    L.append("                else:")
    L.append(f"                    of[o] += tmp[p * {v_} + v]")
    return "\n".join(L) + "\n" + _DRIVER.format(P=p_, V=v_)


def generate_source():
    """The text of :mod:`numbaconv.cpu._ukernels`."""
    return _HEADER + "".join(_gen_ukernel(p_, v_) for p_, v_ in _UK_SHAPES)


if __name__ == "__main__":
    import pathlib
    path = pathlib.Path(__file__).with_name("_ukernels.py")
    path.write_text(generate_source())
    print(f"wrote {path}")
