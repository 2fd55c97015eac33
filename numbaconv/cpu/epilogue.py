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

import numpy as np
from numba import prange

from ..problem import ACTIVATIONS
from ._jit import jit, pjit

__all__ = ["ACTIVATIONS", "CODES", "Epilogue", "NONE", "activate", "apply", "finish", "finish_2d", "python_reference"]

#: ``activation=`` name -> the code the kernels take (0: none)
CODES = {None: 0, **{name: i + 1 for i, name in enumerate(ACTIVATIONS)}}


@jit
def activate(v, act):
    """Activation ``act`` (a code of :data:`CODES`) of one value."""
    if act == 1:  # relu: comparisons keep NaN and -0.0 (max(v, 0) would not)
        return 0.0 if v < 0 else v
    if act == 2:  # relu6
        return 0.0 if v < 0 else (6.0 if v > 6 else v)
    if act == 3:  # silu, torch's formula (silu(-inf) is NaN there too)
        return v / (1.0 + np.exp(-v))
    if act == 4:  # hardswish: x * relu6(x + 3) / 6 (hardswish(-inf) = -inf * 0 = NaN, as torch)
        t = v + 3.0
        return v * (0.0 if t < 0 else (6.0 if t > 6 else t)) / 6.0
    return v


@jit
def finish(y, r, lo, hi, act, has_res):
    """``y[lo:hi] = act(y[lo:hi] + r[lo:hi])`` (``r`` ignored without a residual).  Zero-based
    loops over slices: no wraparound checks, so both loops vectorise."""
    ys = y[lo:hi]
    if has_res:
        rs = r[lo:hi]
        for i in range(hi - lo):
            ys[i] = activate(ys[i] + rs[i], act)
    elif act != 0:
        for i in range(hi - lo):
            ys[i] = activate(ys[i], act)


@jit
def finish_2d(y, r, base, count, stride, length, act, has_res):
    """:func:`finish` on ``count`` runs of ``length`` elements, ``stride`` apart, from ``base``."""
    if act == 0 and not has_res:
        return
    for i in range(count):
        lo = base + i * stride
        finish(y, r, lo, lo + length, act, has_res)


#: elements per parallel chunk: 64 KiB of float32, in L2 with its residual
_CHUNK = 16384


@pjit
def _apply(y, r, act, has_res):
    n = y.size
    for t in prange((n + _CHUNK - 1) // _CHUNK):
        finish(y, r, t * _CHUNK, min(n, t * _CHUNK + _CHUNK), act, has_res)


def apply(out, residual, act):
    """The epilogue over all of ``out`` (C-contiguous); ``residual`` C-contiguous, same shape, or None."""
    if residual is None and act == 0:
        return
    y = out.reshape(-1)
    _apply(y, y if residual is None else residual.reshape(-1), act, residual is not None)


class Epilogue(NamedTuple):
    """What follows the bias: ``act`` (a code of :data:`CODES`) of the sum with ``residual``
    (C-contiguous, the result's shape, never the output array itself; or None)."""

    act: int = 0
    residual: object = None

    @property
    def active(self):
        return self.act != 0 or self.residual is not None

    def kernel_args(self, out_flat):
        """``(residual, act, has_res)`` for kernels: the flat residual (the output itself
        without one, so that every call compiles to one signature)."""
        has_res = self.residual is not None
        return (self.residual.reshape(-1) if has_res else out_flat), self.act, has_res

    def apply(self, out):
        """As a pass over the whole result (for kernels that do not fuse it)."""
        apply(out, self.residual, self.act)


NONE = Epilogue()


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
