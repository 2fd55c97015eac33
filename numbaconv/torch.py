"""PyTorch bridge: numbaconv's forward and backward inside ``torch.autograd``.

This module imports torch (``import numbaconv`` never does; only ``import numbaconv.torch``
does).  It offers:

* :func:`conv2d` -- ``torch.nn.functional.conv2d``'s signature (plus ``padding_mode``), as a
  :class:`torch.autograd.Function` whose forward is :func:`numbaconv.conv2d` and whose
  backward is :func:`numbaconv.conv2d_backward`;
* :class:`Conv2d` -- a drop-in subclass of :class:`torch.nn.Conv2d` (same constructor,
  parameters, ``state_dict``, ``padding_mode``, ``padding="same"/"valid"``) whose
  convolution runs through :func:`conv2d`.

Tensors cross over without copies: a CPU tensor becomes a NumPy view
(``.detach().numpy()``), results come back with ``torch.from_numpy``.  A tensor in
``torch.channels_last`` memory format is handed over as its NHWC view (``layout="NHWC"``,
no copy; a channels-last weight as ``weight_layout="OHWI"``), and the result and the
input gradient come back channels-last too, as torch's own convolution does.

CUDA tensors: when ``"cuda"`` is in :func:`numbaconv.algorithms`, the forward runs
``algorithm="cuda"`` on the device tensors (no host copy) and the backward numbaconv's
CUDA backward kernels (:mod:`numbaconv.cuda.backward`).  Without numbaconv's CUDA algorithm -- and for
dtypes numbaconv does not support (float16, bfloat16, ...) -- :class:`Conv2d` falls back
to torch's own convolution, so a model keeps working wherever it is moved;
:func:`conv2d` instead raises numbaconv's ``TypeError`` for such dtypes on the CPU.
Double backward (gradients of gradients) is not supported.
"""

import torch
from torch.autograd.function import once_differentiable

import numbaconv as _nc

__all__ = ["conv2d", "Conv2d", "Conv2dFunction"]

_HOST_DTYPES = (torch.float32, torch.float64)


def _is_channels_last(t):
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _act_to_numpy(t, layout):
    """NumPy view of an NCHW-shaped tensor in ``layout`` (no copy; numbaconv accepts any strides)."""
    t = t.detach()
    return t.permute(0, 2, 3, 1).numpy() if layout == "NHWC" else t.numpy()


def _act_from_numpy(a, layout):
    t = torch.from_numpy(a)
    return t.permute(0, 3, 1, 2) if layout == "NHWC" else t


def _weight_to_numpy(w, layout):
    """(array, weight_layout): channels-last weights as their OHWI view, others as OIHW."""
    w = w.detach()
    if layout == "NHWC" and _is_channels_last(w):
        return w.permute(0, 2, 3, 1).numpy(), "OHWI"
    return w.numpy(), "OIHW"


def _weight_from_numpy(a, weight_layout):
    t = torch.from_numpy(a)
    return t.permute(0, 3, 1, 2) if weight_layout == "OHWI" else t


def _geometry(stride, padding, dilation, groups, padding_mode):
    if isinstance(padding, list):
        padding = tuple(tuple(p) if isinstance(p, list) else p for p in padding)
    return dict(stride=tuple(stride) if isinstance(stride, list) else stride, padding=padding,
                dilation=tuple(dilation) if isinstance(dilation, list) else dilation,
                groups=groups, padding_mode=padding_mode)


class Conv2dFunction(torch.autograd.Function):
    """``y = conv2d(x, weight, bias)`` with numbaconv's forward and backward: the CPU kernels
    for CPU tensors, the CUDA kernels for CUDA tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry):
        ctx.geometry = geometry
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        if x.is_cuda:
            return _cuda_forward(x, weight, bias, geometry)
        layout = "NHWC" if _is_channels_last(x) else "NCHW"
        xa = _act_to_numpy(x, layout)
        wa, weight_layout = _weight_to_numpy(weight, layout)
        ba = None if bias is None else bias.detach().numpy()
        ctx.layouts = (layout, weight_layout)
        y = _nc.conv2d(xa, wa, ba, layout=layout, weight_layout=weight_layout, **geometry)
        return _act_from_numpy(y, layout)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if x.is_cuda:
            dx, dw, db = _cuda_backward(ctx, x, weight, grad_output, need_x, need_w, need_b)
            return dx, dw, db, None
        layout, weight_layout = ctx.layouts
        xa = _act_to_numpy(x, layout)
        wa = _weight_to_numpy(weight, layout)[0]
        gy = _act_to_numpy(grad_output, layout)
        dx, dw, db = _nc.conv2d_backward(gy, xa, wa, layout=layout, weight_layout=weight_layout,
                                         input_grad=need_x, weight_grad=need_w,
                                         bias_grad=need_b and ctx.has_bias, **ctx.geometry)
        return (None if dx is None else _act_from_numpy(dx, layout),
                None if dw is None else _weight_from_numpy(dw, weight_layout),
                None if db is None else torch.from_numpy(db),
                None)


def _cuda_forward(x, weight, bias, geometry):
    y = _nc.conv2d(x.detach(), weight.detach(), None if bias is None else bias.detach(),
                   algorithm="cuda", **geometry)
    return torch.as_tensor(y, device=x.device)


def _cuda_backward(ctx, x, weight, gy, need_x, need_w, need_b):
    """numbaconv's CUDA backward kernels (:mod:`numbaconv.cuda.backward`) on the device
    tensors, on torch's current stream; torch tensors out."""
    from .cuda.backward import conv2d_backward_cuda

    need_b = need_b and ctx.has_bias
    dx, dw, db = conv2d_backward_cuda(gy.detach(), x.detach(), weight.detach(), need=(need_x, need_w, need_b),
                                      **ctx.geometry)
    return dx, dw, db


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *, padding_mode="zeros"):
    """``torch.nn.functional.conv2d`` computed by numbaconv, differentiable.

    Same arguments as torch's (``padding``: int, pair, ``"same"``, ``"valid"``, and also
    numbaconv's ``((top, bottom), (left, right))``); ``padding_mode`` is numbaconv's
    extension (``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``), the gradient
    of a non-zero mode folds back through the padding's index map.  ``input`` may be
    unbatched ``(C, H, W)``.  CPU float32/float64 tensors run numbaconv's forward and
    backward; channels-last tensors run as NHWC without copies.
    """
    unbatched = input.dim() == 3
    if unbatched:
        input = input.unsqueeze(0)
    geometry = _geometry(stride, padding, dilation, groups, padding_mode)
    y = Conv2dFunction.apply(input, weight, bias, geometry)
    return y.squeeze(0) if unbatched else y


class Conv2d(torch.nn.Conv2d):
    """Drop-in :class:`torch.nn.Conv2d` whose convolution (forward and backward) is numbaconv's.

    Same constructor, parameters, initialisation and ``state_dict`` as ``torch.nn.Conv2d``
    (so weights load either way).  Where the work runs:

    * CPU, float32/float64: numbaconv forward and backward (:func:`conv2d`), every
      ``padding`` form and ``padding_mode`` (the padding is handed to numbaconv, whose
      backward folds the gradient of reflect/replicate/circular padding back);
    * CUDA, when ``"cuda"`` is in :func:`numbaconv.algorithms`: numbaconv's CUDA forward and
      backward kernels;
    * anything else -- CUDA without numbaconv's CUDA algorithm, other devices, dtypes
      numbaconv does not support (float16, bfloat16): torch's own convolution, because
      numbaconv has no kernel for them; results are then exactly ``torch.nn.Conv2d``'s.
    """

    def _conv_forward(self, input, weight, bias):
        if not self._numbaconv_can_run(input, weight):
            return super()._conv_forward(input, weight, bias)
        if self.padding_mode == "zeros":
            padding = self.padding
        else:  # as torch: the padding it materialises, (left, right, top, bottom) reversed
            left, right, top, bottom = self._reversed_padding_repeated_twice
            padding = ((top, bottom), (left, right))
        return conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups,
                      padding_mode=self.padding_mode)

    @staticmethod
    def _numbaconv_can_run(input, weight):
        if input.dtype not in _HOST_DTYPES or weight.dtype != input.dtype:
            return False
        if input.device.type == "cpu" and weight.device.type == "cpu":
            return True
        return input.is_cuda and "cuda" in _nc.algorithms()
