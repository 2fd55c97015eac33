"""``conv2d`` backward on the GPU: ``@cuda.jit`` kernels for the gradients w.r.t. the input,
the weight and the bias (the CUDA sibling of :mod:`numbaconv.grad.backward`).

Every geometry of the contract (stride, dilation, groups, every padding form and mode), NCHW
and NHWC, float32 and float64; activations and ``grad_output`` may have any strides.

* **grad-input** -- one thread per position of the *padded* input: it sums ``w * dy`` over
  the outputs that read that position (stride and dilation decide which taps land on it),
  then adds the sum into the input pixel the padding mode maps the position to (zero
  padding: none; reflect / replicate / circular: several positions share one pixel, hence
  ``cuda.atomic.add`` into a zeroed ``dx``).  Threads are numbered in ``dx``'s memory
  order (along ``W`` in NCHW, ``C`` in NHWC), like the forward's direct kernel.
* **grad-weight** -- one block per weight element ``(k, c, r, s)``: its threads stride over
  the ``N*Ho*Wo`` output pixels (``dy * x`` at the tap's input pixel) and a shared-memory
  tree reduction adds them up; the result is written in the weight's own layout.
* **grad-bias** -- one block per output channel, the same reduction over ``dy``.

Padding modes are the forward's index map (:func:`numbaconv.cuda.conv._src_py`, an inlined
device function).  The host glue (device arrays of numba, CuPy or torch used in place on their current
stream, NumPy copied in and out) is :mod:`numbaconv.cuda.conv`'s.
"""

import functools
import math

import numpy as np

from . import conv as cc
from ..problem import ConvProblem, check_array

__all__ = ["conv2d_backward_cuda", "REDUCE_BLOCK", "ptx_targets"]

#: threads per block of the grad-weight / grad-bias reductions (a power of two)
REDUCE_BLOCK = 128

#: module globals the kernels resolve: ``cuda`` and the padding index map ``_src`` (the
#: inlined device function of :func:`numbaconv.cuda.conv._src_py`), bound lazily
cuda = None
_src = None
_tree_sum = None


def _tree_sum_py(sm, tid, block):
    """``sm[0] = sum(sm[:block])`` by the block's threads (``block`` a power of two); a
    device function, inlined."""
    cuda.syncthreads()
    half = block // 2
    while half > 0:
        if tid < half:
            sm[tid] += sm[tid + half]
        cuda.syncthreads()
        half //= 2


def _grad_input_py(np_dtype, nhwc):
    zero = np_dtype.type(0)

    def grad_input(dy, wp, dx, n_, h_, w_, c_, ho_, wo_, r_, s_, hp, wq, cg, kg, sh, sw, pt, pl, dh, dw, mode):
        idx = cuda.grid(1)
        if idx >= n_ * c_ * hp * wq:
            return
        if nhwc:
            c = idx % c_
            t = idx // c_
            xq = t % wq
            t = t // wq
            yq = t % hp
            n = t // hp
        else:
            xq = idx % wq
            t = idx // wq
            yq = t % hp
            t = t // hp
            c = t % c_
            n = t // c_
        hi = _src(yq - pt, h_, mode)  # the input pixel this padded position holds
        wi = _src(xq - pl, w_, mode)
        if hi < 0 or wi < 0:  # zero padding: no input pixel
            return
        g = c // cg
        cl = c - g * cg
        acc = zero
        for r in range(r_):
            ty = yq - r * dh  # = oh * sh for the output row whose tap r reads this row
            if ty < 0 or ty % sh != 0 or ty // sh >= ho_:
                continue
            oh = ty // sh
            for s in range(s_):
                tx = xq - s * dw
                if tx < 0 or tx % sw != 0 or tx // sw >= wo_:
                    continue
                ow = tx // sw
                kr = (cl * r_ + r) * s_ + s
                for j in range(kg):
                    if nhwc:
                        acc += dy[n, oh, ow, g * kg + j] * wp[g, kr, j]
                    else:
                        acc += dy[n, g * kg + j, oh, ow] * wp[g, kr, j]
        if nhwc:
            cuda.atomic.add(dx, (n, hi, wi, c), acc)
        else:
            cuda.atomic.add(dx, (n, c, hi, wi), acc)

    return grad_input


def _grad_weight_py(np_dtype, nb_dtype, nhwc, block):
    zero = np_dtype.type(0)

    def grad_weight(x, dy, dwt, code, n_, h_, w_, ho_, wo_, r_, s_, cg, kg, sh, sw, pt, pl, dh, dw, mode):
        e = cuda.blockIdx.x  # weight element, OIHW order
        s = e % s_
        t = e // s_
        r = t % r_
        t = t // r_
        c = t % cg
        k = t // cg
        ci = (k // kg) * cg + c
        tid = cuda.threadIdx.x
        acc = zero
        for q in range(tid, n_ * ho_ * wo_, block):
            ow = q % wo_
            t = q // wo_
            oh = t % ho_
            n = t // ho_
            hi = _src(oh * sh - pt + r * dh, h_, mode)
            wi = _src(ow * sw - pl + s * dw, w_, mode)
            if hi < 0 or wi < 0:
                continue
            if nhwc:
                acc += dy[n, oh, ow, k] * x[n, hi, wi, ci]
            else:
                acc += dy[n, k, oh, ow] * x[n, ci, hi, wi]
        sm = cuda.shared.array(block, nb_dtype)
        sm[tid] = acc
        _tree_sum(sm, tid, block)
        if tid == 0:
            if code == 0:
                dwt[k, c, r, s] = sm[0]
            elif code == 1:
                dwt[r, s, c, k] = sm[0]
            else:
                dwt[k, r, s, c] = sm[0]

    return grad_weight


def _grad_bias_py(np_dtype, nb_dtype, nhwc, block):
    zero = np_dtype.type(0)

    def grad_bias(dy, db, n_, ho_, wo_):
        k = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        acc = zero
        for q in range(tid, n_ * ho_ * wo_, block):
            ow = q % wo_
            t = q // wo_
            oh = t % ho_
            n = t // ho_
            if nhwc:
                acc += dy[n, oh, ow, k]
            else:
                acc += dy[n, k, oh, ow]
        sm = cuda.shared.array(block, nb_dtype)
        sm[tid] = acc
        _tree_sum(sm, tid, block)
        if tid == 0:
            db[k] = sm[0]

    return grad_bias


@functools.lru_cache(maxsize=None)
def _pyfuncs(dtype_name, nhwc, block):
    """Plain Python kernel functions (closures over compile-time constants) for one variant."""
    global cuda, _src, _tree_sum
    cuda = cc._import_cuda()
    _src = cc._src
    if _tree_sum is None:
        _tree_sum = cuda.jit(device=True, inline="always")(_tree_sum_py)
    from numba import types  # noqa: PLC0415

    np_dtype = np.dtype(dtype_name)
    nb_dtype = getattr(types, dtype_name)
    return {"grad_input": _grad_input_py(np_dtype, nhwc),
            "grad_weight": _grad_weight_py(np_dtype, nb_dtype, nhwc, block),
            "grad_bias": _grad_bias_py(np_dtype, nb_dtype, nhwc, block)}


@functools.lru_cache(maxsize=None)
def _kernel(name, dtype_name, nhwc, block):
    return cc._import_cuda().jit(_pyfuncs(dtype_name, nhwc, block)[name])


def ptx_targets():
    """``(name, python function, signature)`` of every backward kernel (see scripts/check_ptx.py)."""
    targets = []
    for t in ("float32", "float64"):
        act = f"{t}[:, :, :, :]"
        ints = lambda n: ", ".join(["int64"] * n)  # noqa: E731
        sigs = {"grad_input": f"void({act}, {t}[:, :, ::1], {act}, {ints(19)})",
                "grad_weight": f"void({act}, {act}, {act}, {ints(17)})",
                "grad_bias": f"void({act}, {t}[:], {ints(3)})"}
        for nhwc in (False, True):
            funcs = _pyfuncs(t, nhwc, REDUCE_BLOCK)
            for name, sig in sigs.items():
                targets.append((f"{name}_{'NHWC' if nhwc else 'NCHW'}_{t}", funcs[name], sig))
        targets.append((f"fill_zero_{t}", _fill_zero_py(np.dtype(t)), f"void({t}[::1])"))
    return targets


def _check_grad_output(grad_output, p):
    check_array("grad_output", grad_output, allow_device=True)
    if grad_output.dtype != p.dtype:
        raise TypeError(f"grad_output has dtype {grad_output.dtype} but x has dtype {p.dtype}; they must match")
    if tuple(grad_output.shape) != p.out_shape:
        raise ValueError(f"grad_output has shape {tuple(grad_output.shape)} but the convolution's output has "
                         f"shape {p.out_shape} ({p.layout})")


def conv2d_backward_cuda(grad_output, x, weight, *, stride=1, padding=0, dilation=1, groups=1,
                         padding_mode="zeros", layout="NCHW", weight_layout=None, need=(True, True, True),
                         block=REDUCE_BLOCK):
    """``(grad_input, grad_weight, grad_bias)`` of ``conv2d`` on the GPU.

    Same arguments as :func:`numbaconv.conv2d_backward`; ``need`` says which of the three to
    compute (the others are ``None``).  Device arrays in (numba, CuPy, torch) -> device
    arrays of the same library out, on its current stream; NumPy in -> NumPy out.
    ``grad_input`` has ``x``'s shape in ``layout``, ``grad_weight`` the weight's shape in
    ``weight_layout``, ``grad_bias`` ``(K,)``.
    """
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block!r}")
    cu = cc._import_cuda()
    with cc._on_device_of(x):
        stream = cc._stream([a for a in (grad_output, x, weight) if a is not None])
        gv, xv, wv = (cc._view(a) for a in (grad_output, x, weight))
        p = ConvProblem.from_args(xv, wv, None, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                  padding_mode=padding_mode, layout=layout, weight_layout=weight_layout,
                                  allow_device=True)
        _check_grad_output(gv, p)
        np_dtype = np.dtype(p.dtype)
        t = np_dtype.name
        nhwc = p.layout == "NHWC"
        on_device = cc.is_device_array(x)

        def device(a):
            return a if cc.is_device_array(a) else cu.to_device(np.ascontiguousarray(a), stream=stream)

        def result(shape, like):
            """(object to return, numba view to write): device array of ``like``'s library, or NumPy."""
            if on_device:
                return cc._empty(shape, np_dtype, like, stream)
            d = cu.device_array(shape, dtype=np_dtype, stream=stream)
            return None, d

        want_dx, want_dw, want_db = need
        outs = []
        dy = device(gv)
        mode = cc._MODE_CODE[p.padding_mode]
        if want_dx:
            obj, dx = result(p.in_shape, x)
            if p.n and p.c and p.h and p.w:
                _zero(dx, stream)
                hp, wq = p.h + p.pad_top + p.pad_bottom, p.w + p.pad_left + p.pad_right
                if cc.is_device_array(wv):  # packed (g, c r s, j) by the forward's pack kernel
                    _, wp = cc._empty((p.groups, p.cg * p.r * p.s, p.kg), np_dtype, weight, stream)
                    total = p.k * p.cg * p.r * p.s
                    cc._kernel("pack", t, False)[math.ceil(total / cc.DIRECT_BLOCK), cc.DIRECT_BLOCK, stream](
                        wv, wp, cc._WEIGHT_CODE[p.weight_layout], False, p.kg, p.cg, p.r, p.s)
                else:
                    wp = cu.to_device(cc._pack_host(wv, p.weight_layout, False, p.groups), stream=stream)
                total = p.n * p.c * hp * wq
                _kernel("grad_input", t, nhwc, block)[math.ceil(total / cc.DIRECT_BLOCK), cc.DIRECT_BLOCK, stream](
                    dy, wp, dx, p.n, p.h, p.w, p.c, p.ho, p.wo, p.r, p.s, hp, wq, p.cg, p.kg,
                    p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w, mode)
            outs.append((obj, dx))
        else:
            outs.append(None)
        if want_dw:
            obj, dwt = result(tuple(wv.shape), weight)
            xd = device(xv)
            _kernel("grad_weight", t, nhwc, block)[p.k * p.cg * p.r * p.s, block, stream](
                xd, dy, dwt, cc._WEIGHT_CODE[p.weight_layout], p.n, p.h, p.w, p.ho, p.wo, p.r, p.s, p.cg, p.kg,
                p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w, mode)
            outs.append((obj, dwt))
        else:
            outs.append(None)
        if want_db:
            obj, db = result((p.k,), x)
            _kernel("grad_bias", t, nhwc, block)[p.k, block, stream](dy, db, p.n, p.ho, p.wo)
            outs.append((obj, db))
        else:
            outs.append(None)
        if on_device:
            return tuple(None if o is None else o[0] for o in outs)
        host = tuple(None if o is None else o[1].copy_to_host(stream=stream) for o in outs)
        stream.synchronize()
        return host


def _zero(d, stream):
    """``d[...] = 0`` on the device (the grad-input kernel adds into it)."""
    flat = d.reshape(d.size) if d.is_c_contiguous() else None
    if flat is None:  # pragma: no cover - results are allocated C-contiguous
        raise ValueError("expected a C-contiguous device array")
    _kernel_fill(np.dtype(d.dtype).name)[math.ceil(max(d.size, 1) / cc.DIRECT_BLOCK), cc.DIRECT_BLOCK, stream](flat)


def _fill_zero_py(np_dtype):
    zero = np_dtype.type(0)

    def fill_zero(a):
        i = cuda.grid(1)
        if i < a.size:
            a[i] = zero

    return fill_zero


@functools.lru_cache(maxsize=None)
def _kernel_fill(dtype_name):
    global cuda
    cuda = cc._import_cuda()
    return cuda.jit(_fill_zero_py(np.dtype(dtype_name)))
