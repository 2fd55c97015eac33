"""The fused epilogue: ``y = activation(y + residual)`` on a convolution's result.

``conv2d(..., activation=, residual=)`` (and :class:`numbaconv.Conv2dPlan`) apply it to
the result blocks while they are still in cache: an algorithm module that sets
``FUSES_EPILOGUE`` takes an :class:`Epilogue` (``run(..., epi=)``) and its kernels call
:func:`finish` / :func:`finish_2d` on the part of the result they have just completed (the
bias already in it); for the others the front door runs :func:`apply` after the kernel, a
parallel pass over the result.  The residual handed to kernels is never the output itself
(the front door copies it for ``out=residual``: kernels overwrite the output first).  Activations follow
``torch.nn.functional``'s definitions, special values included: NaN stays NaN,
``relu(-0.0)`` is ``-0.0``, ``silu(-inf)`` and ``hardswish(-inf)`` are NaN.

:func:`python_reference` is the same arithmetic in plain Python, for reading and tests.
"""

import math
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import literal_unroll
from numba.core import types
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from ..problem import ACTIVATION_CODES as CODES
from ..problem import ACTIVATIONS
from ._jit import FASTMATH, jit
from ._launch import Task, call_by_address, task_address, type_key

__all__ = ["ACTIVATIONS", "CODES", "Epilogue", "NONE", "activate", "after", "apply", "finish", "finish_2d",
           "python_reference"]



@intrinsic
def _pow2(typingctx, n, like):
    """``2.0 ** n`` in ``like``'s float type, for integral ``n`` within its normal exponent
    range: the exponent bits set directly (plain integer IR, so loops around it vectorise)."""
    if not isinstance(like, types.Float) or not isinstance(n, types.Integer):
        return None
    bits, bias, mantissa = (32, 127, 23) if like.bitwidth == 32 else (64, 1023, 52)

    def codegen(context, builder, signature, args):
        ity = ir.IntType(bits)
        e = args[0]
        if e.type.width < bits:
            e = builder.sext(e, ity)
        elif e.type.width > bits:
            e = builder.trunc(e, ity)
        e = builder.shl(builder.add(e, ity(bias)), ity(mantissa))
        return builder.bitcast(e, ir.FloatType() if bits == 32 else ir.DoubleType())
    return like(n, like), codegen


@intrinsic
def _opaque(typingctx, x):
    """``x`` (a float) through an empty inline-asm statement: a value the optimiser cannot
    fold (its bits pass through a general register, once per call)."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, signature, args):
        ity = ir.IntType(x.bitwidth)
        bits = builder.asm(ir.FunctionType(ity, [ity]), "", "=r,0", [builder.bitcast(args[0], ity)],
                           side_effect=False)
        return builder.bitcast(bits, args[0].type)
    return x(x), codegen


def _activation(act, v):
    """Activation number ``act`` (a compile-time literal) of ``v``, in ``v``'s float type."""


# error_model="numpy": IEEE division (Python's model checks each divisor for zero, and that
# branch keeps the loops scalar)
@overload(_activation, jit_options={"fastmath": {"contract"}, "error_model": "numpy"})
def _activation_impl(act, v):
    if not isinstance(act, types.IntegerLiteral) or not isinstance(v, types.Float):
        return None
    f = as_dtype(v).type
    zero, one, three, six = f(0), f(1), f(3), f(6)
    code = act.literal_value
    if code == 1:  # relu: comparisons keep NaN and -0.0 (max(v, 0) would not)
        return lambda act, v: zero if v < zero else v
    if code == 2:  # relu6
        return lambda act, v: zero if v < zero else (six if v > six else v)
    if code == 4:  # hardswish: v * relu6(v + 3) / 6 (hardswish(-inf) = -inf * 0 = NaN, as torch)
        def hardswish(act, v):
            t = v + three
            return v * (zero if t < zero else (six if t > six else t)) / six
        return hardswish
    if code != 3:
        return lambda act, v: v
    # silu: torch's v / (1 + exp(-v)).  exp as Cephes' (range reduction by ln 2, then a
    # polynomial; ~1 ulp), in v's type and with no call: libm's exp per element was 30x
    # slower than relu and kept the loop scalar.  The vector loop is bound by its dependency
    # chain and its constants (Zen 1 keeps ~2 iterations in flight; 16 ymm registers), so
    # both are kept short: clamps of v itself, -v never formed; NaN and overflow clamp to
    # where 2**k = 2**(emax + 1) is inf by its bits (exp(-v) = inf, then NaN / inf = NaN and
    # -inf / inf = NaN, as torch); rint() rounds; float32's polynomial in Estrin's form
    # (depth 3 instead of 5).  With _loop's two streams 1.25x faster than the Horner form
    # with one compare, 1.6x than with four clamps (Zen 1).
    if v.bitwidth == 32:
        lo, hi = f(-89.0), f(87.0)  # exp(-v) = inf below lo (2**128), > 2**-126 up to hi
        c = (f(1.9875691500e-4), f(1.3981999507e-3), f(8.3334519073e-3), f(4.1665795894e-2),
             f(1.6666665459e-1), f(5.0000001201e-1))
        ln2hi, ln2lo = f(0.693359375), f(-2.12194440e-4)
    else:  # Taylor terms 1/2! .. 1/13!: below 1e-16 relative on |r| <= ln(2)/2
        lo, hi = f(-710.0), f(708.0)  # 2**1024 and > 2**-1022
        c = tuple(f(1 / math.factorial(i)) for i in range(13, 1, -1))
        ln2hi, ln2lo = f(6.93145751953125e-1), f(1.42860682030941723212e-6)
    nlog2e = f(-1.4426950408889634)
    exponent = np.int32 if v.bitwidth == 32 else np.int64
    estrin = len(c) == 6

    def silu(act, v):
        vc = v if v > lo else lo  # (NaN -> lo)
        vc = vc if vc < hi else hi
        k = np.rint(vc * nlog2e)  # exp(-v) = 2**k * exp(r)
        r = -vc - k * ln2hi - k * ln2lo
        r2 = r * r
        if estrin:
            p = ((c[0] * r + c[1]) * r2 + (c[2] * r + c[3])) * r2 + (c[4] * r + c[5])
        else:
            p = c[0]
            for ci in literal_unroll(c[1:]):
                p = p * r + ci
        return v / (one + (p * r2 + (r + one)) * _pow2(exponent(k), one))
    return silu


@jit
def activate(v, act):
    """Activation ``act`` (a code of :data:`CODES`) of one value."""
    if act == 1:
        return _activation(1, v)
    if act == 2:
        return _activation(2, v)
    if act == 3:
        return _activation(3, v)
    if act == 4:
        return _activation(4, v)
    return v


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _loop(ys, rs, count, stride, n, act, has_res):
    """``count`` runs of ``n`` elements, ``stride`` apart, from ``ys[0]``: ``ys = act(ys + rs)``.
    Unsigned indices (no negative-index wraparound select), so each run vectorises."""
    un = np.uintp(n)
    us = np.uintp(stride)
    # x * 1 through a value LLVM cannot see: without it, relu's store of "the element itself
    # unless negative" became a masked store of zeros (vmaskmovps, microcoded on AMD: relu
    # ran 3.7x slower than relu6)
    one = _opaque(ys.dtype.type(1))
    # SiLU's chain is long (latency-bound): each iteration takes one element from each half
    # of the run, two independent chains (1.2x on Zen 1); the other activations stream
    half = un // np.uintp(2) if act == 3 else np.uintp(0)
    if has_res:
        for i in range(np.uintp(count)):
            o = i * us
            for j in range(half):
                a = ys[o + j] + rs[o + j]
                b = ys[o + half + j] + rs[o + half + j]
                ys[o + j] = _activation(act, a)
                ys[o + half + j] = _activation(act, b)
            for j in range(half + half, un):
                ys[o + j] = _activation(act, ys[o + j] + rs[o + j])
    else:
        for i in range(np.uintp(count)):
            o = i * us
            for j in range(half):
                a = ys[o + j] * one
                b = ys[o + half + j] * one
                ys[o + j] = _activation(act, a)
                ys[o + half + j] = _activation(act, b)
            for j in range(half + half, un):
                ys[o + j] = _activation(act, ys[o + j] * one)


@jit
def finish(y, r, lo, hi, act, has_res):
    """``y[lo:hi] = act(y[lo:hi] + r[lo:hi])`` (``r`` ignored without a residual)."""
    _runs(y, r, lo, 1, 0, hi - lo, act, has_res)


@jit
def finish_2d(y, epi, base, count, stride, length):
    """:func:`finish` on ``count`` runs of ``length`` elements, ``stride`` apart, from
    ``base``.  ``epi``: ``None``, or ``(residual, act, has_res, address)``
    (:meth:`Epilogue.kernel_arg`).  Kernels take ``epi`` as an argument: with ``None`` Numba
    prunes every epilogue branch at compile time, so kernels run without one compile none of
    its code (first-call latency).  With one, the runs are done by :func:`_runs` compiled on
    its own (per activation), called through its ``address``: a kernel that called it
    directly linked its five activation loops and optimised and emitted them again (~1 s of every kernel
    family's compile on Zen 1, 3.4 s for the first one)."""
    if epi is None:
        return
    r, act, has_res, address = epi
    _runs_at(address, y, r, base, count, stride, length, act, has_res)


@intrinsic
def _runs_at(typingctx, address, y, r, base, count, stride, length, act, has_res):
    """``_runs_literal(y, r, base, count, stride, length, act, has_res)`` through its ``address``
    (:func:`_runs_address`: compiled for 1-D contiguous arrays of ``y``'s dtype -- any 1-D
    array passes the same way -- and for ``act``'s value, passed as an int64 like any
    integer literal).  Numba's calling convention; it raises nothing."""
    if not (isinstance(y, types.Array) and isinstance(r, types.Array) and y.ndim == r.ndim == 1
            and y.dtype == r.dtype):
        return None
    flat = types.Array(y.dtype, 1, "C")
    argtys = (flat, flat) + (types.int64,) * 5 + (types.boolean,)
    sig = types.void(address, y, r, base, count, stride, length, act, has_res)

    def codegen(context, builder, signature, args):
        vals = [args[1], args[2]] + [context.cast(builder, args[i], signature.args[i], argtys[i - 1])
                                     for i in range(3, 9)]
        address = context.cast(builder, args[0], signature.args[0], types.int64)
        call_by_address(context, builder, address, types.none, argtys, vals)
        return context.get_dummy_value()
    return sig, codegen


@jit
def _runs_literal(y, r, base, count, stride, length, act, has_res):
    """:func:`_runs` for an activation code ``act`` known at compile time (an integer literal:
    only its loop compiles): what kernels call through :func:`_runs_address` (compiled with
    ``has_res`` a literal too: only the loop with or without the residual), and what
    :func:`_runs` dispatches to."""
    if count <= 0 or length <= 0 or (act == 0 and not has_res):
        return
    end = base + (count - 1) * stride + length
    ys = y[base:end]
    _loop(ys, r[base:end] if has_res else ys, count, stride, length, act, has_res)


@jit
def _no_runs(y, r, base, count, stride, length, act, has_res):
    """The runs of a no-op epilogue (no activation, no residual: a ``Conv2dPlan``'s layers
    without either): nothing, compiled in no time."""


_RUNS_ADDRESS = {}


def _runs_address(dtype, act, has_res):
    """Address of :func:`_runs_literal` for ``dtype``, activation code ``act`` and ``has_res``
    (compiled, or loaded from the cache, once per process): only that activation's loop,
    with or without the residual, compiles (all five activations of :func:`_runs` took 3.3 s
    on Zen 1, SiLU's ``exp`` the most; both residual variants of one ~0.9 s, one ~0.5)."""
    key = (dtype, act, has_res)  # (an np.dtype or its name: the first use of either compiles once)
    address = _RUNS_ADDRESS.get(key)
    if address is None:
        fn = _no_runs if act == 0 and not has_res else _runs_literal
        address = _RUNS_ADDRESS[key] = task_address(fn, _runs_signature(dtype, act, has_res), lo_hi=False)
    return address


def _runs_signature(dtype, act, has_res=None):
    """:func:`_runs_literal`'s argument types for ``dtype``, activation code ``act`` and
    ``has_res`` (a literal; None: any)."""
    flat = numba.from_dtype(np.dtype(dtype))[::1]
    return (flat, flat) + (types.int64,) * 4 + (types.literal(act),
                                                 types.boolean if has_res is None else types.literal(has_res))


def loop_asm(act, dtype=np.float32):
    """Machine code of the runs of activation code ``act`` (:func:`_runs_literal` with its
    loops) for ``dtype`` on the compile target, compiled afresh (Numba cannot inspect code
    loaded from its cache): for the codegen tests."""
    fn = numba.njit(cache=False, nogil=True, fastmath=FASTMATH)(_runs_literal.py_func)
    fn.compile(_runs_signature(dtype, act))
    return fn.inspect_asm(fn.signatures[0])


@jit
def _runs(y, r, base, count, stride, length, act, has_res):
    """The runs of :func:`finish_2d` through one loop nest per activation, each over slices
    from ``base`` and in the array's own float type, so that it vectorises.  (One call per
    run cost more than the run on NHWC blocks: 16-channel runs, one per pixel, took tiled's
    MobileNetV2 expansions from 1.2 to 2.7 ms with ReLU6 on Zen 1.)"""
    if act == 0:
        _runs_literal(y, r, base, count, stride, length, 0, has_res)
    elif act == 1:
        _runs_literal(y, r, base, count, stride, length, 1, has_res)
    elif act == 2:
        _runs_literal(y, r, base, count, stride, length, 2, has_res)
    elif act == 3:
        _runs_literal(y, r, base, count, stride, length, 3, has_res)
    else:
        _runs_literal(y, r, base, count, stride, length, 4, has_res)


#: elements per parallel chunk: 64 KiB of float32, in L2 with its residual
_CHUNK = 16384


@jit
def _apply(lo, hi, y, r, act, has_res):
    """Chunks ``[lo, hi)``."""
    n = y.size
    for t in range(lo, hi):
        finish(y, r, t * _CHUNK, min(n, t * _CHUNK + _CHUNK), act, has_res)


_APPLY = Task(_apply)


def apply(out, residual, act):
    """The epilogue over all of ``out`` (C-contiguous); ``residual`` C-contiguous, same shape, or None."""
    if residual is None and act == 0:
        return
    y = out.reshape(-1)
    _APPLY((y.size + _CHUNK - 1) // _CHUNK, y, y if residual is None else residual.reshape(-1), act,
           residual is not None)


def after(run):
    """``run(x, out)`` as a bound kernel ``(x, out, epi)`` (what the ``bind`` functions
    return) whose epilogue is one pass after it: the paths that do not fuse it."""
    def launch(x, out, epi):
        run(x, out)
        epi.apply(out)
    return launch


class Epilogue(NamedTuple):
    """What follows the bias: ``act`` (a code of :data:`CODES`) of the sum with ``residual``
    (C-contiguous, the result's shape, never the output array itself; or None)."""

    act: int = 0
    residual: object = None
    #: hand kernels the epilogue argument even when there is nothing to apply (a no-op at run
    #: time): a kernel compiles one signature for ``None`` and one for the tuple, and a
    #: plan's layers mix both (a converted model's 1x1 projections and downsampling layers
    #: have no activation), which compiled tiled's task function twice (~5 s on Zen 1)
    always: bool = False

    @classmethod
    def of(cls, activation=None, residual=None, in_place=False):
        """The epilogue of ``conv2d``'s (validated) keywords: the residual made C-contiguous,
        and copied when it is the output itself (``in_place``: kernels overwrite the output
        before their epilogue reads the residual)."""
        if residual is not None:
            residual = residual.copy() if in_place else np.ascontiguousarray(residual)
        return cls(CODES[activation], residual)

    @property
    def active(self):
        return self.act != 0 or self.residual is not None

    def kernel_arg(self, out_flat):
        """What kernels take as ``epi``: ``None`` when inactive (unless ``always``), else
        ``(residual, act, has_res, address)`` with the flat residual (the output itself
        without one, so that every active call compiles to one signature) and the address of
        the compiled runs (see :func:`finish_2d`)."""
        residual, act = self.residual, self.act
        if residual is None:  # (a plan's call: ~0.2 us less than through ``active``)
            if act == 0 and not self.always:
                return None
            return out_flat, act, False, _runs_address(out_flat.dtype, act, False)
        return residual.reshape(-1), act, True, _runs_address(out_flat.dtype, act, True)

    def apply(self, out):
        """As a pass over the whole result (for kernels that do not fuse it)."""
        apply(out, self.residual, self.act)


NONE = Epilogue()


def arg_key(ea):
    """The part of a kernel's type key (:meth:`numbaconv.cpu._launch.Task.run`) that
    :meth:`Epilogue.kernel_arg`'s result ``ea`` decides: None or the flat residual's array
    type (the activation code, the flag and the address are always int, bool and int).
    ``type_key`` of the whole tuple cost 0.8 us of a small layer's ~5 us launch."""
    return None if ea is None else type_key(ea[0])


def python_reference(v, activation):
    """One value, in plain Python (the specification the kernels follow)."""
    if activation is None:
        return v
    if activation == "relu":
        return 0.0 if v < 0 else v
    if activation == "relu6":
        return 0.0 if v < 0 else (6.0 if v > 6 else v)
    if activation == "silu":  # exp overflows to inf (math.exp raises instead)
        e = math.exp(-v) if v > -700 else math.inf
        return v / (1.0 + e)
    t = v + 3.0
    return v * (0.0 if t < 0 else (6.0 if t > 6 else t)) / 6.0
