"""``numbaconv.torch.conv2d`` / ``conv_transpose2d``: torch's functional signatures in front of
the ``numbaconv::`` operators (:mod:`numbaconv.torch.ops`).

The wrappers do what must happen in Python before the operator: drop / add the batch axis of
an unbatched ``(C, H, W)`` input, check the geometry (numbaconv's ``ValueError`` naming the
value, before any work) and resolve ``padding`` to explicit ``[top, bottom, left, right]``.
They are plain integer arithmetic, so Dynamo traces them (symbolic sizes included) and the
graph holds one operator per layer.  Tensors numbaconv has no kernel for (other dtypes,
devices; CUDA without numbaconv's CUDA algorithm, and every CUDA transpose) run torch's own
function, so a model keeps working wherever it is moved.
"""

import numbers

import torch
import torch.nn.functional as F

from ..problem import int_pair, parse_padding
from . import ops

__all__ = ["conv2d", "conv_transpose2d", "resolve"]

HOST_DTYPES = (torch.float32, torch.float64)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def numbaconv_runs(input, weight, transpose=False):
    """numbaconv has a kernel for these tensors (else torch's convolution runs them)."""
    if input.dtype not in HOST_DTYPES or weight.dtype != input.dtype:
        return False
    if input.device.type == "cpu" and weight.device.type == "cpu":
        return True
    return input.is_cuda and not transpose and _cuda_available()


def _cuda_available():
    import numbaconv  # noqa: PLC0415 -- the public package: algorithms() looks for a GPU once

    return "cuda" in numbaconv.algorithms()


def _groups(groups):
    if type(groups) is int and groups >= 1:
        return groups
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    return int(groups)


def _as_pair(value):
    return tuple(value) if isinstance(value, list) else value


def _padding(padding, weight, x, stride, dilation):
    if isinstance(padding, list):
        padding = tuple(tuple(p) if isinstance(p, list) else p for p in padding)
    return list(parse_padding(padding, tuple(weight.shape[-2:]), stride, dilation, tuple(x.shape[-2:])))


def _batched(input):
    if input.dim() == 3:
        return input.unsqueeze(0), True
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D (N, C, H, W) or 3-D (C, H, W), got shape {tuple(input.shape)}")
    return input, False


def resolve(x, weight, stride, padding, dilation, groups, padding_mode):
    """A 4-D ``x``'s geometry as the ``numbaconv::conv2d`` operators take it: ``stride``,
    ``[top, bottom, left, right]``, ``dilation`` as lists, ``groups``; numbaconv's errors."""
    stride, dilation = int_pair("stride", _as_pair(stride), 1), int_pair("dilation", _as_pair(dilation), 1)
    groups = _groups(groups)
    pads = _padding(padding, weight, x, stride, dilation)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    return list(stride), pads, list(dilation), groups


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros"):
    """``torch.nn.functional.conv2d`` computed by numbaconv, differentiable (``numbaconv::conv2d``).

    Same arguments as torch's (``padding``: int, pair, ``"same"``, ``"valid"``, and also
    numbaconv's ``((top, bottom), (left, right))``; ``"same"`` with a stride follows
    numbaconv's rule); ``padding_mode`` is numbaconv's extension (``"zeros"``, ``"reflect"``,
    ``"replicate"``, ``"circular"``): the gradient of a non-zero mode folds back through the
    padding's index map.  ``input`` may be unbatched ``(C, H, W)``.  CPU float32/float64
    tensors run numbaconv's forward and backward kernels; channels-last tensors run as NHWC
    without copies.
    """
    x, unbatched = _batched(input)
    stride, pads, dilation, groups = resolve(x, weight, stride, padding, dilation, groups, padding_mode)
    if x.device.type == "cpu" or numbaconv_runs(x, weight):  # (CPU: numbaconv's TypeError for other dtypes)
        y = ops.run_conv2d(x, weight, bias, stride, pads, dilation, groups, padding_mode)
    else:
        top, bottom, left, right = pads
        mode = "constant" if padding_mode == "zeros" else padding_mode
        y = F.conv2d(F.pad(x, (left, right, top, bottom), mode=mode), weight, bias, tuple(stride), 0,
                     tuple(dilation), groups)
    return y.squeeze(0) if unbatched else y


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """``torch.nn.functional.conv_transpose2d`` computed by numbaconv, differentiable
    (``numbaconv::conv_transpose2d``; its gradients run ``numbaconv::conv2d`` and
    ``numbaconv::conv2d_backward``).  Same arguments as torch's; ``input`` may be unbatched;
    channels-last CPU tensors run as NHWC without copies.  CUDA tensors run torch's."""
    x, unbatched = _batched(input)
    stride, dilation = int_pair("stride", _as_pair(stride), 1), int_pair("dilation", _as_pair(dilation), 1)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair of ints for conv_transpose2d, got {padding!r}")
    pads = int_pair("padding", _as_pair(padding), 0)
    output_padding = int_pair("output_padding", _as_pair(output_padding), 0)
    groups = _groups(groups)
    if x.device.type == "cpu":
        y = ops.run_conv_transpose2d(x, weight, bias, list(stride), list(pads), list(output_padding), list(dilation),
                                 groups)
    else:
        y = F.conv_transpose2d(x, weight, bias, stride, pads, output_padding, groups, dilation)
    return y.squeeze(0) if unbatched else y
