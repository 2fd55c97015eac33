"""Memory layouts of activations and weights, and conversion between them.

Activations are ``NCHW`` (PyTorch's default) or ``NHWC`` (channels-last, TensorFlow's
default).  Weights are ``OIHW`` (PyTorch), ``HWIO`` (TensorFlow) or ``OHWI``
(channels-last PyTorch / oneDNN's ``nhwc`` weights).  ``O`` is the number of output
channels and ``I`` the number of input channels per group.

Why the layout matters for speed: a convolution is a reduction over input channels and
kernel taps, producing output channels.  In NHWC the channels of one pixel are
contiguous, so both the reduction (over ``C``) and the produced vector (over ``K``) run
along unit stride: the natural shape for SIMD.  In NCHW a pixel's channels are
``H*W`` elements apart, so fast NCHW kernels vectorise along the image width instead.
"""

import numpy as np

__all__ = ["ACTIVATION_LAYOUTS", "WEIGHT_LAYOUTS", "DEFAULT_WEIGHT_LAYOUT", "convert_layout"]

ACTIVATION_LAYOUTS = ("NCHW", "NHWC")
WEIGHT_LAYOUTS = ("OIHW", "HWIO", "OHWI")
DEFAULT_WEIGHT_LAYOUT = {"NCHW": "OIHW", "NHWC": "HWIO"}


def _check_letters(name, value):
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string of axis letters such as 'NCHW', got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name}={value!r} repeats an axis letter")


def permutation(src, dst):
    """Axes order that turns an array in layout ``src`` into layout ``dst``."""
    return tuple(src.index(letter) for letter in dst)


def convert_layout(a, src, dst):
    """Return a C-contiguous copy of ``a`` with its axes reordered from ``src`` to ``dst``.

    ``src`` and ``dst`` are strings of axis letters, e.g. ``("NCHW", "NHWC")`` or
    ``("OIHW", "HWIO")``; any permutation of the same letters is accepted.
    """
    _check_letters("src", src)
    _check_letters("dst", dst)
    if sorted(src) != sorted(dst):
        raise ValueError(f"src={src!r} and dst={dst!r} must be permutations of the same letters")
    a = np.asarray(a)
    if a.ndim != len(src):
        raise ValueError(f"a has {a.ndim} dimensions but src={src!r} names {len(src)}")
    # Always a copy (the contract says so), even when the permutation is the identity.
    return np.array(np.transpose(a, permutation(src, dst)), order="C", copy=True)


def to_layout(a, src, dst):
    """Internal: like :func:`convert_layout` but returns ``a`` itself when no copy is needed."""
    if src == dst:  # the usual case (NCHW + OIHW, NHWC + HWIO): skip the permutation (~1 us)
        return np.ascontiguousarray(a)
    return np.ascontiguousarray(np.transpose(a, permutation(src, dst)))
