"""``cuda``: ``@cuda.jit`` convolution kernels and their host glue (optional: ``numbaconv[cuda]``).

Two kernels, both NCHW and NHWC, float32 and float64, every geometry of the contract
(stride, dilation, groups, bias, every padding form and mode):

* **direct** -- one thread per output element, threads numbered in the output's memory
  order, so neighbouring threads write (and, at stride 1, read) neighbouring addresses
  along the innermost layout dimension (``W`` for NCHW, ``K`` for NHWC).  Chosen for
  depthwise-like problems (few output channels per group), where a GEMM tile would idle.
* **implicit GEMM** (the default) -- per group, ``C[M, N] = A[M, Kr] @ B[Kr, N]`` with
  ``M = N*Ho*Wo`` output pixels, ``N = K/groups`` output channels and
  ``Kr = (C/groups)*R*S`` the reduction.  ``A`` (input patches) is never materialised:
  each ``BK``-slice of the reduction, the block stages a ``BM x BK`` tile of patches and a
  ``BK x BN`` tile of (pre-packed) weights in shared memory, with neighbouring threads
  loading neighbouring addresses (along ``W`` in NCHW, along ``C`` in NHWC, along ``K``
  for the weights); each thread then accumulates a fixed ``TM x TN`` register tile held
  in ``cuda.local.array`` (fully unrolled, so it lives in registers; ``scripts/check_ptx.py``
  checks the PTX has no local-memory traffic).

Padding modes are index maps inside the kernels (``_src``), so nothing is padded or
copied; device inputs never leave the device.  Weights are packed once per call into
``(groups, Kr, K/groups)`` with the reduction in the same order as the patch loads (on
the host for NumPy weights, by a small kernel for device weights).

Host side: NumPy inputs are copied in and the result copied out; device arrays (numba
device arrays, CuPy, torch CUDA tensors -- anything with ``__cuda_array_interface__``, or
DLPack) are used in place, the result is a device array of the same library where that
library is torch or CuPy (else a numba device array), and work runs on torch's / CuPy's
current stream.

``numba.cuda`` is imported lazily: importing this module (and ``numbaconv``) works without
numba-cuda, and :func:`available` never imports it on a machine with no GPU driver
unless the simulator is requested (``NUMBA_ENABLE_CUDASIM=1``).
"""

import contextlib
import ctypes
import functools
import importlib.util
import math
import os
import sys

import numpy as np
from numba import uint64

from ..layout import DEFAULT_WEIGHT_LAYOUT, permutation
from ..problem import (ACTIVATION_CODES, SUPPORTED_DTYPES, ConvProblem, _has_cai, _is_dlpack_cuda, _library,
                       check_activation, check_residual, is_device_array)

__all__ = ["available", "real_gpu", "conv2d_cuda", "plan", "GEMM_CONFIGS", "ptx_targets"]

#: module global so kernels resolve ``cuda.xxx`` (and the simulator can swap it); set lazily
cuda = None
#: :func:`_src_py` as an inlined device function (bound with ``cuda``)
_src = None

_MODE_CODE = {"zeros": 0, "reflect": 1, "replicate": 2, "circular": 3}
_WEIGHT_CODE = {"OIHW": 0, "HWIO": 1, "OHWI": 2}
DIRECT_BLOCK = 128

#: name -> (BM, BN, BK, TM, TN): block tile of M (pixels) x N (output channels), the
#: reduction slice, and the per-thread register tile; threads = (BM/TM) * (BN/TN)
GEMM_CONFIGS = {
    "gemm128": (128, 128, 8, 8, 8),   # 256 threads, 8x8 register tile: float32, large problems
    "gemm64": (64, 64, 16, 4, 4),     # 256 threads, 4x4 register tile: small problems, float64
    "gemm8": (8, 8, 4, 2, 2),         # 16 threads: tiny tiles, so simulator tests cross tile edges
}
KERNELS = ("auto", "direct", "gemm") + tuple(GEMM_CONFIGS)


# --- availability ------------------------------------------------------------------------
def _sim_requested():
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _sim_loaded():
    return "numba.cuda.simulator_init" in sys.modules


@functools.lru_cache(maxsize=None)
def _driver_present():
    """A CUDA driver library can be loaded (cheap; does not import numba.cuda)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


@functools.lru_cache(maxsize=None)
def _hardware_available():
    return bool(_import_cuda().is_available())


def _import_cuda():
    """``numba.cuda`` (simulator or hardware, as ``NUMBA_ENABLE_CUDASIM`` says on first import)."""
    global cuda
    if cuda is None:
        if "numba.cuda" not in sys.modules:
            from numba.core import config  # noqa: PLC0415 -- numba caches env vars: re-read them
            config.reload_config()
        from numba import cuda as module  # noqa: PLC0415
        global _src
        _src = module.jit(device=True, inline="always")(_src_py)
        cuda = module
    return cuda


def available():
    """``"cuda"`` can run here: numba-cuda is installed and a GPU (or the simulator) is present.

    Cheap and never raises.  The simulator counts while ``NUMBA_ENABLE_CUDASIM`` asks for
    it; with neither it nor a CUDA driver, ``numba.cuda`` is not even imported.
    """
    try:
        if importlib.util.find_spec("numba_cuda") is None:
            return False
        if "numba.cuda" in sys.modules:
            if _sim_loaded():
                return _sim_requested()
            return _hardware_available()
        if _sim_requested():
            _import_cuda()
            return _sim_loaded()
        if not _driver_present():
            return False
        return _hardware_available()
    except Exception:  # noqa: BLE001 -- broken install or driver: just not available
        return False


def real_gpu():
    """A real GPU (not the simulator) is usable.  Cheap, never raises, and never imports
    ``numba.cuda`` on a machine without a CUDA driver -- so calling it early (at import or
    collection time) cannot lock a later simulator run out."""
    try:
        if importlib.util.find_spec("numba_cuda") is None:
            return False
        if "numba.cuda" in sys.modules:
            return not _sim_loaded() and _hardware_available()
        if not _driver_present() or _sim_requested():
            return False
        return _hardware_available()
    except Exception:  # noqa: BLE001
        return False


# --- kernels -----------------------------------------------------------------------------
def _src_py(i, size, mode):
    """Input coordinate read by padded coordinate ``i``; -1 for a zero-padding tap.

    Every kernel (forward and backward) calls it as the device function ``_src``, inlined.
    """
    if i >= 0 and i < size:
        return i
    if mode == 0:  # zeros
        return -1
    if mode == 1:  # reflect (edge excluded); validation keeps the padding below size
        if i < 0:
            return -i
        return 2 * (size - 1) - i
    if mode == 2:  # replicate
        if i < 0:
            return 0
        return size - 1
    if i < 0:  # circular; validation keeps the padding <= size
        return i + size
    return i - size


def _direct_py(np_dtype, nhwc):
    zero = np_dtype.type(0)

    def direct(x, wp, bias, out, has_bias, n_, h_, w_, k_, r_, s_, ho_, wo_, cg, kg,
               sh, sw, pt, pl, dh, dw, mode):
        idx = cuda.grid(1)
        if idx >= n_ * k_ * ho_ * wo_:
            return
        if nhwc:  # threads run along K, the innermost output dimension
            k = idx % k_
            t = idx // k_
            ow = t % wo_
            t = t // wo_
            oh = t % ho_
            n = t // ho_
        else:  # threads run along Wo
            ow = idx % wo_
            t = idx // wo_
            oh = t % ho_
            t = t // ho_
            k = t % k_
            n = t // k_
        g = k // kg
        j = k - g * kg
        c0 = g * cg
        acc = zero
        for r in range(r_):
            hi = _src(oh * sh - pt + r * dh, h_, mode)  # the padding mode's index map
            if hi < 0:
                continue
            for s in range(s_):
                wi = _src(ow * sw - pl + s * dw, w_, mode)
                if wi < 0:
                    continue
                for c in range(cg):  # unsigned indices (all >= 0): no wraparound code
                    if nhwc:
                        acc += (x[uint64(n), uint64(hi), uint64(wi), uint64(c0 + c)]
                                * wp[uint64(g), uint64((r * s_ + s) * cg + c), uint64(j)])
                    else:
                        acc += (x[uint64(n), uint64(c0 + c), uint64(hi), uint64(wi)]
                                * wp[uint64(g), uint64((c * r_ + r) * s_ + s), uint64(j)])
        if has_bias:
            acc += bias[k]
        if nhwc:
            out[n, oh, ow, k] = acc
        else:
            out[n, k, oh, ow] = acc

    return direct


def _gemm_py(np_dtype, nb_dtype, nhwc, config, int_type):
    bm, bn, bk, tm, tn = config
    nty, ntx = bm // tm, bn // tn       # threads along M and along N
    nt = ntx * nty
    assert (bm * bk) % nt == 0 and (bk * bn) % nt == 0 and nt >= bk
    a_per, b_per = bm * bk // nt, bk * bn // nt
    bmp = bm + 1                         # padded row of the patch tile: fewer bank conflicts
    a_size, b_size, acc_size = bk * bmp, bk * bn, tm * tn

    def gemm(x, wp, bias, out, has_bias, m_total, h_, w_, r_, s_, ho_, wo_, cg, kg, k_, kred,
             sh, sw, pt, pl, dh, dw, mode):
        """``out`` is the flat (1-D) view of the C-contiguous result."""
        a_tile = cuda.shared.array(a_size, nb_dtype)
        b_tile = cuda.shared.array(b_size, nb_dtype)
        tab_c = cuda.shared.array(bk, int_type)   # reduction index -> channel, row tap, col tap
        tab_r = cuda.shared.array(bk, int_type)
        tab_s = cuda.shared.array(bk, int_type)
        acc = cuda.local.array(acc_size, nb_dtype)
        a_reg = cuda.local.array(tm, nb_dtype)
        b_reg = cuda.local.array(tn, nb_dtype)
        a_pf = cuda.local.array(a_per, nb_dtype)  # the next tile, fetched while this one computes
        b_pf = cuda.local.array(b_per, nb_dtype)
        # pixel (n, top row, left col) of each patch element this thread loads, fixed over the loop
        a_n = cuda.local.array(a_per, int_type)
        a_h = cuda.local.array(a_per, int_type)
        a_w = cuda.local.array(a_per, int_type)
        row_base = cuda.local.array(tm, int_type)

        tid = cuda.threadIdx.x
        if nhwc:   # output channels fastest: NHWC stores run along K
            tx = tid % ntx
            ty = tid // ntx
        else:      # pixels fastest: NCHW stores run along Wo
            ty = tid % nty
            tx = tid // nty
        a_col = uint64(ty)
        b_col = uint64(tx)
        m0 = cuda.blockIdx.x * bm
        n0 = cuda.blockIdx.y * bn
        g = cuda.blockIdx.z
        c0 = g * cg
        hw_o = ho_ * wo_
        ntiles = (kred + bk - 1) // bk

        for i in range(acc_size):
            acc[i] = 0
        for i in range(a_per):
            e = tid + i * nt
            if nhwc:
                mm = e // bk
            else:
                mm = e % bm
            m = m0 + mm
            if m < m_total:
                n = m // hw_o
                rem = m - n * hw_o
                oh = rem // wo_
                ow = rem - oh * wo_
                a_n[i] = n
                a_h[i] = oh * sh - pt
                a_w[i] = ow * sw - pl
            else:
                a_n[i] = -1
                a_h[i] = 0
                a_w[i] = 0

        # Software pipeline, one load site and one compute site: iteration t fetches tile t
        # into registers, multiplies tile t-1 from shared memory meanwhile, then stages tile t.
        kt = tid  # the reduction table of tile 0
        if tid < bk:
            if nhwc:   # reduction order (r, s, c): channels contiguous in memory
                rs = kt // cg
                tab_c[tid] = kt - rs * cg
            else:      # reduction order (c, r, s)
                rs = kt % (r_ * s_)
                tab_c[tid] = kt // (r_ * s_)
            tab_r[tid] = (rs // s_) * dh
            tab_s[tid] = (rs % s_) * dw
        cuda.syncthreads()
        for t in range(ntiles + 1):
            k0 = t * bk
            if t < ntiles:
                for i in range(a_per):
                    e = tid + i * nt
                    if nhwc:   # neighbouring threads: neighbouring channels of one pixel
                        kk = e % bk
                    else:      # neighbouring threads: neighbouring output pixels
                        kk = e // bm
                    n = a_n[i]
                    hi = a_h[i] + tab_r[kk]
                    wi = a_w[i] + tab_s[kk]
                    ok = n >= 0 and k0 + kk < kred
                    hi = _src(hi, h_, mode)  # the padding mode's index map (-1: zero padding)
                    wi = _src(wi, w_, mode)
                    ok = ok and hi >= 0 and wi >= 0
                    if ok:  # every index is >= 0 here: unsigned, so no wraparound code
                        if nhwc:
                            a_pf[i] = x[uint64(n), uint64(hi), uint64(wi), uint64(c0 + tab_c[kk])]
                        else:
                            a_pf[i] = x[uint64(n), uint64(c0 + tab_c[kk]), uint64(hi), uint64(wi)]
                    else:
                        a_pf[i] = 0
                for i in range(b_per):
                    e = tid + i * nt
                    kk = e // bn
                    nn = e % bn
                    if k0 + kk < kred and n0 + nn < kg:
                        b_pf[i] = wp[uint64(g), uint64(k0 + kk), uint64(n0 + nn)]
                    else:
                        b_pf[i] = 0
            if t > 0:
                # unsigned shared-memory indices: no negative-index wraparound code in the hot loop
                for kk in range(bk):
                    ka = uint64(kk * bmp) + a_col
                    kb = uint64(kk * bn) + b_col
                    for i in range(tm):
                        a_reg[i] = a_tile[ka + uint64(i * nty)]
                    for j in range(tn):
                        b_reg[j] = b_tile[kb + uint64(j * ntx)]
                    for i in range(tm):
                        for j in range(tn):
                            acc[i * tn + j] += a_reg[i] * b_reg[j]
            cuda.syncthreads()  # tile t-1 and the table of tile t are no longer read
            if t < ntiles:
                for i in range(a_per):
                    e = tid + i * nt
                    if nhwc:
                        a_tile[uint64((e % bk) * bmp + e // bk)] = a_pf[i]
                    else:
                        a_tile[uint64((e // bm) * bmp + e % bm)] = a_pf[i]
                for i in range(b_per):
                    b_tile[uint64(tid + i * nt)] = b_pf[i]
                kt = k0 + bk + tid  # the reduction table of tile t+1
                if tid < bk:
                    if nhwc:
                        rs = kt // cg
                        tab_c[tid] = kt - rs * cg
                    else:
                        rs = kt % (r_ * s_)
                        tab_c[tid] = kt // (r_ * s_)
                    tab_r[tid] = (rs // s_) * dh
                    tab_s[tid] = (rs % s_) * dw
            cuda.syncthreads()

        # epilogue: flat offsets, so the register tile is read at constant indices only
        for i in range(tm):
            m = m0 + ty + i * nty
            if m < m_total:
                if nhwc:
                    row_base[i] = m * k_
                else:
                    n = m // hw_o
                    row_base[i] = n * k_ * hw_o + (m - n * hw_o)
            else:
                row_base[i] = -1
        kstride = 1 if nhwc else hw_o
        for j in range(tn):
            kout = n0 + tx + j * ntx
            if has_bias and kout < kg:  # (no ternary: float32 vs int would unify to float64)
                b_reg[j] = bias[g * kg + kout]
            else:
                b_reg[j] = 0
        for i in range(tm):
            for j in range(tn):
                kout = n0 + tx + j * ntx
                if row_base[i] >= 0 and kout < kg:
                    out[uint64(row_base[i] + (g * kg + kout) * kstride)] = acc[i * tn + j] + b_reg[j]

    return gemm


def _pack_py():
    def pack(w, wp, code, nhwc, kg, cg, r_, s_):
        """``w`` (any weight layout, any strides) -> ``wp[g, kr, j]``, reduction in load order."""
        idx = cuda.grid(1)
        k_ = wp.shape[0] * kg
        if idx >= k_ * cg * r_ * s_:
            return
        s = idx % s_
        t = idx // s_
        r = t % r_
        t = t // r_
        c = t % cg
        o = t // cg
        if code == 0:
            v = w[o, c, r, s]
        elif code == 1:
            v = w[r, s, c, o]
        else:
            v = w[o, r, s, c]
        g = o // kg
        if nhwc:
            kr = (r * s_ + s) * cg + c
        else:
            kr = (c * r_ + r) * s_ + s
        wp[g, kr, o - g * kg] = v

    return pack


def _epilogue_py(np_dtype):
    zero = np_dtype.type(0)
    one = np_dtype.type(1)
    three = np_dtype.type(3)
    six = np_dtype.type(6)

    def epilogue(o, r, act, has_res):
        """``o = act(o + r)``, one thread per element (``o`` C-contiguous, ``r`` any strides):
        the activations of numbaconv.cpu.epilogue, NaN kept by comparisons."""
        idx = cuda.grid(1)
        d0, d1, d2, d3 = o.shape
        if idx >= d0 * d1 * d2 * d3:
            return
        e = idx % d3
        t = idx // d3
        c = t % d2
        t = t // d2
        b = t % d1
        a = t // d1
        v = o[a, b, c, e]
        if has_res:
            v += r[a, b, c, e]
        if act == 1:
            v = zero if v < zero else v
        elif act == 2:
            v = zero if v < zero else (six if v > six else v)
        elif act == 3:
            v = v / (one + math.exp(-v))
        elif act == 4:
            u = v + three
            v = v * (zero if u < zero else (six if u > six else u)) / six
        o[a, b, c, e] = v

    return epilogue


@functools.lru_cache(maxsize=None)
def _pyfuncs(dtype_name, nhwc):
    """Plain Python kernel functions (closures over compile-time constants) for one variant."""
    _import_cuda()
    from numba import types  # noqa: PLC0415

    np_dtype = np.dtype(dtype_name)
    nb_dtype = getattr(types, dtype_name)
    funcs = {"direct": _direct_py(np_dtype, nhwc), "epilogue": _epilogue_py(np_dtype)}
    for name, config in GEMM_CONFIGS.items():
        funcs[name] = _gemm_py(np_dtype, nb_dtype, nhwc, config, types.int64)
    return funcs


@functools.lru_cache(maxsize=None)
def _kernel(name, dtype_name, nhwc):
    if name == "pack":
        return _import_cuda().jit(_pack_py())
    return _import_cuda().jit(_pyfuncs(dtype_name, nhwc)[name])


# --- PTX check (catches typing errors the simulator never sees) --------------------------
def _signatures(dtype_name):
    t = dtype_name
    x = f"{t}[:, :, :, :]"
    direct = f"void({x}, {t}[:, :, ::1], {t}[::1], {t}[:, :, :, ::1], boolean, " + ", ".join(["int64"] * 17) + ")"
    gemm = f"void({x}, {t}[:, :, ::1], {t}[::1], {t}[::1], boolean, " + ", ".join(["int64"] * 18) + ")"
    pack = f"void({t}[:, :, :, :], {t}[:, :, ::1], int64, boolean, int64, int64, int64, int64)"
    epilogue = f"void({t}[:, :, :, ::1], {t}[:, :, :, :], int64, boolean)"
    return direct, gemm, pack, epilogue


def ptx_targets():
    """``(name, python function, signature)`` for every forward kernel the host glue launches
    (:mod:`numbaconv.cuda.ptx` adds the backward's)."""
    targets = []
    for dtype_name in ("float32", "float64"):
        direct_sig, gemm_sig, pack_sig, epilogue_sig = _signatures(dtype_name)
        for nhwc in (False, True):
            layout = "NHWC" if nhwc else "NCHW"
            funcs = _pyfuncs(dtype_name, nhwc)
            targets.append((f"direct_{layout}_{dtype_name}", funcs["direct"], direct_sig))
            for name in GEMM_CONFIGS:
                targets.append((f"{name}_{layout}_{dtype_name}", funcs[name], gemm_sig))
        targets.append((f"pack_{dtype_name}", _pack_py(), pack_sig))
        targets.append((f"epilogue_{dtype_name}", _pyfuncs(dtype_name, False)["epilogue"], epilogue_sig))
    return targets


# --- host glue -----------------------------------------------------------------------------
def _view(a):
    """A numba device-array view of device array ``a`` (zero-copy); other objects unchanged."""
    if a is None or isinstance(a, np.ndarray) or getattr(a, "__cuda_ndarray__", False):
        return a
    if _library(a) == "torch" and getattr(a, "is_cuda", False):
        a = a.detach()  # a forward pass only: no autograd through numbaconv
    if _has_cai(a):
        # sync=False: we run on the exporting library's current stream (see _stream)
        return cuda.as_cuda_array(a, sync=False)
    if _is_dlpack_cuda(a):
        from cuda.core.utils import StridedMemoryView  # noqa: PLC0415 -- numba-cuda's dependency
        smv = StridedMemoryView.from_dlpack(a, stream_ptr=-1)
        itemsize = np.dtype(smv.dtype).itemsize
        strides = None if smv.strides is None else tuple(st * itemsize for st in smv.strides)
        desc = {"shape": tuple(smv.shape), "strides": strides, "typestr": np.dtype(smv.dtype).str,
                "data": (smv.ptr, False), "version": 3}
        return cuda.from_cuda_array_interface(desc, owner=a, sync=False)
    return a


def _stream(objects):
    """torch's / CuPy's current stream when any argument is theirs, else numba's default stream."""
    for a in objects:
        lib = _library(a)
        if lib == "torch" and getattr(a, "is_cuda", False):
            torch = sys.modules["torch"]
            return cuda.external_stream(torch.cuda.current_stream(a.device).cuda_stream)
        if lib == "cupy":
            cupy = sys.modules["cupy"]
            return cuda.external_stream(cupy.cuda.get_current_stream().ptr)
    return cuda.default_stream()


def _empty(shape, np_dtype, like, stream):
    """A C-contiguous device array: ``(object to return, numba view)``, in ``like``'s library."""
    lib = _library(like)
    if lib == "torch" and getattr(like, "is_cuda", False):
        torch = sys.modules["torch"]
        t = torch.empty(shape, dtype=getattr(torch, np_dtype.name), device=like.device)
        return t, cuda.as_cuda_array(t, sync=False)
    if lib == "cupy":
        cupy = sys.modules["cupy"]
        with cupy.cuda.Device(like.device.id):
            t = cupy.empty(shape, dtype=np_dtype)
        return t, cuda.as_cuda_array(t, sync=False)
    d = cuda.device_array(shape, dtype=np_dtype, stream=stream)
    return d, d


def _device_span(a):
    """``(start, stop)`` byte addresses a device array may touch, or None if unknown."""
    desc = getattr(a, "__cuda_array_interface__", None)
    if desc is None:
        return None
    start = desc["data"][0]
    itemsize = np.dtype(desc["typestr"]).itemsize
    shape = desc["shape"]
    if any(d == 0 for d in shape):
        return start, start
    strides = desc.get("strides") or tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) * itemsize
                                           for i in range(len(shape)))
    lo = start + sum(min(0, (d - 1) * st) for d, st in zip(shape, strides))
    hi = start + sum(max(0, (d - 1) * st) for d, st in zip(shape, strides)) + itemsize
    return lo, hi


def _overlaps(a, b):
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.may_share_memory(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    if hasattr(a, "_ary") and hasattr(b, "_ary"):  # simulator arrays wrap numpy arrays
        return np.may_share_memory(a._ary, b._ary)
    sa, sb = _device_span(a), _device_span(b)
    return sa is not None and sb is not None and sa[0] < sb[1] and sb[0] < sa[1]


def _check_out(problem, out, inputs):
    """``out`` checks of the contract, for NumPy or device ``out`` (a numba view)."""
    if out is None:
        return
    if isinstance(out, np.ndarray):
        problem.check_out(out, *[(name, a) for name, a in inputs if isinstance(a, np.ndarray)])
        return
    if not getattr(out, "__cuda_ndarray__", False):
        raise TypeError(f"out must be None, a numpy.ndarray or a device array, got {type(out).__name__}")
    if out.dtype != problem.dtype:
        raise TypeError(f"out has dtype {out.dtype} but the result has dtype {problem.dtype}")
    if tuple(out.shape) != problem.out_shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but the result has shape {problem.out_shape}")
    if not out.is_c_contiguous():
        raise ValueError("out must be C-contiguous")
    for name, a in inputs:
        if a is not None and _overlaps(out, a):
            raise ValueError(f"out must not share memory with {name} (inputs are never modified)")


def _pack_host(weight, weight_layout, nhwc, groups):
    """NumPy weights -> ``(groups, Kr, K/groups)`` in the kernels' reduction order."""
    w = np.transpose(weight, permutation(weight_layout, "OIHW"))  # (K, Cg, R, S) view
    k, cg, r, s = w.shape
    w = w.reshape(groups, k // groups, cg, r, s)
    w = w.transpose(0, 3, 4, 2, 1) if nhwc else w.transpose(0, 2, 3, 4, 1)  # (g, [r s c | c r s], j)
    return np.ascontiguousarray(w.reshape(groups, cg * r * s, k // groups))


def choose_kernel(p, sm_count=132):
    """The kernel ``kernel="auto"`` runs for problem ``p``."""
    if p.kg <= 4:  # depthwise-like: a GEMM tile of >= 64 output channels would idle
        return "direct"
    return _gemm_config(p, sm_count)


def _gemm_config(p, sm_count=132):
    if p.dtype == np.float64:
        return "gemm64"
    m = p.n * p.ho * p.wo
    blocks128 = math.ceil(m / 128) * math.ceil(p.kg / 128) * p.groups
    if p.kg >= 96 and blocks128 >= 2 * sm_count:
        return "gemm128"
    return "gemm64"


def _sm_count():
    try:
        return int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # noqa: BLE001 -- simulator or odd driver: assume an H100
        return 132


def conv2d_cuda(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
                padding_mode="zeros", layout="NCHW", weight_layout=None, activation=None, residual=None, out=None,
                kernel="auto"):
    """``conv2d`` on the GPU (``numbaconv.conv2d(..., algorithm="cuda")`` lands here).

    ``kernel``: ``"auto"`` (implicit GEMM, or the direct kernel for depthwise-like
    problems), ``"direct"``, ``"gemm"`` (implicit GEMM, tile picked by size) or a tile
    name from :data:`GEMM_CONFIGS`.  NumPy in -> NumPy out; device arrays in -> device
    array out (torch in -> torch out, CuPy in -> CuPy out), no host round trip.
    """
    with _on_device_of(x):
        result, o_d, stream, launch, _ = plan(x, weight, bias, stride=stride, padding=padding,
                                              dilation=dilation, groups=groups, padding_mode=padding_mode,
                                              layout=layout, weight_layout=weight_layout, activation=activation,
                                              residual=residual, out=out, kernel=kernel)
        if launch is None:
            return result
        launch()
        if isinstance(result, np.ndarray):
            o_d.copy_to_host(result, stream=stream)
            stream.synchronize()
    return result


def _on_device_of(x):
    """Numba's context for the GPU holding a torch / CuPy ``x`` (a no-op otherwise)."""
    index = None
    lib = _library(x)
    if lib == "torch" and getattr(x, "is_cuda", False):
        index = x.device.index
    elif lib == "cupy":
        index = x.device.id
    if index is None:
        return contextlib.nullcontext()
    return cuda.gpus[index]


def plan(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros",
         layout="NCHW", weight_layout=None, activation=None, residual=None, out=None, kernel="auto"):
    """Validate, stage the operands on the device and pack the weights; launch nothing yet.

    Returns ``(result, out_device, stream, launch, kernel_name)``: ``launch()`` runs the
    convolution kernel into ``out_device``, then the epilogue kernel when there is an
    ``activation`` or ``residual`` (``launch`` is None for an empty batch);
    ``result`` is what :func:`conv2d_cuda` returns (``out_device`` itself for device
    inputs, else a NumPy array to copy into).  ``scripts/bench_cuda.py`` times ``launch``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    _import_cuda()
    raw = {"x": x, "weight": weight, "bias": bias, "out": out}
    stream = _stream([a for a in raw.values() if a is not None])
    xv, wv, bv, ov = (_view(a) for a in (x, weight, bias, out))
    problem = ConvProblem.from_args(xv, wv, bv, stride=stride, padding=padding, dilation=dilation,
                                    groups=groups, padding_mode=padding_mode, layout=layout,
                                    weight_layout=weight_layout, allow_device=True)
    _check_out(problem, ov, (("x", xv), ("weight", wv), ("bias", bv)))
    check_activation(activation)
    rv, in_place = _check_residual(problem, residual, ov)
    p = problem
    device_result = is_device_array(x)
    np_dtype = np.dtype(p.dtype)

    # the result: device array (x on the device) or NumPy (x on the host)
    if out is not None:
        result = out
    elif device_result:
        result, ov = _empty(p.out_shape, np_dtype, x, stream)
    else:
        result = np.empty(p.out_shape, dtype=np_dtype)
    if p.n == 0:
        return result, None, stream, None, None

    nhwc = p.layout == "NHWC"
    dtype_name = np_dtype.name
    x_d = xv if is_device_array(xv) else cuda.to_device(np.ascontiguousarray(xv), stream=stream)
    if is_device_array(wv):
        _, wp = _empty((p.groups, p.cg * p.r * p.s, p.kg), np_dtype, weight, stream)
        total = p.k * p.cg * p.r * p.s
        _kernel("pack", dtype_name, nhwc)[math.ceil(total / DIRECT_BLOCK), DIRECT_BLOCK, stream](
            wv, wp, _WEIGHT_CODE[p.weight_layout], nhwc, p.kg, p.cg, p.r, p.s)
    else:
        wp = cuda.to_device(_pack_host(wv, p.weight_layout, nhwc, p.groups), stream=stream)
    has_bias = bv is not None
    if not has_bias:
        b_d = _empty((1,), np_dtype, x, stream)[1]
    elif is_device_array(bv):
        b_d = bv
    else:
        b_d = cuda.to_device(np.ascontiguousarray(bv), stream=stream)
    if ov is None or isinstance(ov, np.ndarray):
        o_d = cuda.device_array(p.out_shape, dtype=np_dtype, stream=stream)
    else:
        o_d = ov

    name = choose_kernel(p, _sm_count()) if kernel == "auto" else kernel
    if name == "gemm":
        name = _gemm_config(p, _sm_count())
    mode = _MODE_CODE[p.padding_mode]
    geometry = (p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w, mode)
    if name == "direct":
        total = p.n * p.k * p.ho * p.wo
        configured = _kernel("direct", dtype_name, nhwc)[math.ceil(total / DIRECT_BLOCK), DIRECT_BLOCK, stream]
        args = (x_d, wp, b_d, o_d, has_bias, p.n, p.h, p.w, p.k, p.r, p.s, p.ho, p.wo, p.cg, p.kg, *geometry)
    else:
        bm, bn, _, tm, tn = GEMM_CONFIGS[name]
        m = p.n * p.ho * p.wo
        grid = (math.ceil(m / bm), math.ceil(p.kg / bn), p.groups)
        configured = _kernel(name, dtype_name, nhwc)[grid, (bm // tm) * (bn // tn), stream]
        args = (x_d, wp, b_d, o_d.reshape(o_d.size), has_bias, m, p.h, p.w, p.r, p.s, p.ho, p.wo, p.cg,
                p.kg, p.k, p.cg * p.r * p.s, *geometry)
    launch = functools.partial(configured, *args)
    if activation is not None or rv is not None:
        if rv is None:
            r_d = o_d
        elif isinstance(rv, np.ndarray):
            r_d = cuda.to_device(np.ascontiguousarray(rv), stream=stream)
        elif in_place:  # out=residual: the convolution overwrites it first
            r_d = cuda.device_array(p.out_shape, dtype=np_dtype, stream=stream)
            r_d.copy_to_device(rv, stream=stream)
        else:
            r_d = rv
        total = int(np.prod(p.out_shape))
        epi = _kernel("epilogue", dtype_name, False)[math.ceil(total / DIRECT_BLOCK), DIRECT_BLOCK, stream]
        launch = functools.partial(_launch_all, launch, functools.partial(
            epi, o_d, r_d, ACTIVATION_CODES[activation], rv is not None))
    return result, o_d, stream, launch, name


def _launch_all(*launches):
    for launch in launches:
        launch()


def _check_residual(problem, residual, out):
    """``(residual view, whether out is the residual)``: the contract's checks for a NumPy or
    device ``residual`` (a numba view of it is returned)."""
    if residual is None:
        return None, False
    if isinstance(residual, np.ndarray):
        host_out = out if isinstance(out, np.ndarray) else None
        return residual, check_residual(problem, residual, host_out)
    rv = _view(residual)
    if not getattr(rv, "__cuda_ndarray__", False):
        raise TypeError(f"residual must be None, a numpy.ndarray or a device array, got {type(residual).__name__}")
    if rv.dtype != problem.dtype:
        raise TypeError(f"residual has dtype {rv.dtype} but the result has dtype {problem.dtype}")
    if tuple(rv.shape) != problem.out_shape:
        raise ValueError(f"residual has shape {tuple(rv.shape)} but the result has shape {problem.out_shape}")
    in_place = False
    if out is not None and _overlaps(out, rv):
        same = (getattr(out, "device_ctypes_pointer", None) is not None
                and out.device_ctypes_pointer.value == rv.device_ctypes_pointer.value
                and tuple(out.strides) == tuple(rv.strides)) or (
                    hasattr(out, "_ary") and hasattr(rv, "_ary") and out._ary.ctypes.data == rv._ary.ctypes.data
                    and out._ary.strides == rv._ary.strides)
        if not same:
            raise ValueError("out overlaps residual without being the same array (only out=residual, the "
                             "in-place update, may share memory)")
        in_place = True
    return rv, in_place


#: the registry entry: ``api.conv2d`` hands over the raw arguments
run = conv2d_cuda
