"""numbaconv's convolutions as torch custom operators (namespace ``numbaconv``).

One opaque operator per convolution is what lets ``torch.compile(fullgraph=True)`` and
``torch.export`` take a model through numbaconv: Dynamo does not trace into the NumPy /
Numba code (it stops at ``.numpy()``, ctypes and caches: a graph break each), it records
the operator and asks its *fake* implementation for the result's shape, dtype and strides.

* ``numbaconv::conv2d(x, weight, bias?, stride, padding, dilation, groups, padding_mode)``:
  4-D ``x``; ``padding`` explicit ``[top, bottom, left, right]`` (the functional wrapper in
  :mod:`numbaconv.torch.functional` resolves ``"same"`` and the other forms first);
* ``numbaconv::conv2d_backward(grad_output, x, weight, ..., output_mask)``: the three
  gradients in one call (masked-off ones come back as empty tensors: an operator returns
  tensors, not ``None``); registered as ``conv2d``'s autograd formula;
* ``numbaconv::conv_transpose2d(x, weight, bias?, stride, padding, output_padding, dilation,
  groups)``: its gradients are a ``numbaconv::conv2d`` (input) and a
  ``numbaconv::conv2d_backward`` (weight), so the backward graph is numbaconv's too;
* ``numbaconv::conv2d_fused(x, weight, bias?, residual?, ..., activation)``: inference with the
  fused epilogue, what :func:`numbaconv.torch.convert`'s layers run when compiled / exported.

Memory format: a ``channels_last`` CPU tensor runs as NHWC without copies and its result
is channels-last (the fake implementations say the same, so compiled graphs keep the
format).  CUDA tensors (``conv2d`` / ``conv2d_backward`` only) run numbaconv's
``@cuda.jit`` kernels on the device tensors, contiguous results.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

import numbaconv as _nc

__all__ = ["conv2d", "conv2d_backward", "conv2d_fused", "conv_transpose2d", "run_conv2d", "run_conv_transpose2d"]


def is_channels_last(t):
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def layout_of(x):
    """numbaconv's activation layout for ``x``: NHWC for a channels-last CPU tensor."""
    return "NHWC" if x.device.type == "cpu" and is_channels_last(x) else "NCHW"


def act_to_numpy(t, layout):
    """NumPy view of an NCHW-shaped tensor in ``layout`` (no copy; numbaconv accepts any strides)."""
    if t.requires_grad:  # (``numpy()`` refuses those; ``detach()`` costs ~1.5 us a call)
        t = t.detach()
    return t.permute(0, 2, 3, 1).numpy() if layout == "NHWC" else t.numpy()


def act_from_numpy(a, layout):
    t = torch.from_numpy(a)
    return t.permute(0, 3, 1, 2) if layout == "NHWC" else t


def weight_layout_of(w, layout):
    """Channels-last weights of an NHWC problem run as their OHWI view, all others as OIHW."""
    return "OHWI" if layout == "NHWC" and is_channels_last(w) else "OIHW"


def weight_to_numpy(w, weight_layout):
    """The same channels-last view as an activation's: OHWI is OIHW as NHWC is NCHW."""
    return act_to_numpy(w, "NHWC" if weight_layout == "OHWI" else "NCHW")


def weight_from_numpy(a, weight_layout):
    return act_from_numpy(a, "NHWC" if weight_layout == "OHWI" else "NCHW")


def _empty(like, shape, channels_last):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


def geometry(stride, padding, dilation, groups, padding_mode):
    """The operator's arguments as numbaconv's keywords."""
    top, bottom, left, right = padding
    # (the shortest form of each is the one numbaconv parses fastest: ~10 us on a small layer)
    pads = (top, left) if top == bottom and left == right else ((top, bottom), (left, right))
    return dict(stride=_short(stride), padding=_short(pads), dilation=_short(dilation), groups=groups,
                padding_mode=padding_mode)


def _short(pair):
    return pair[0] if pair[0] == pair[1] and type(pair[0]) is int else tuple(pair)


# --- conv2d ---------------------------------------------------------------------------------
def conv2d_impl(x, weight, bias, geometry):
    """``numbaconv.conv2d(x, weight, bias, **geometry)`` on tensors (4-D ``x``)."""
    if x.is_cuda:
        y = _nc.conv2d(x.detach(), weight.detach(), None if bias is None else bias.detach(), algorithm="cuda",
                       **geometry)
        return torch.as_tensor(y, device=x.device)
    layout = layout_of(x)
    weight_layout = weight_layout_of(weight, layout)
    y = _nc.conv2d(act_to_numpy(x, layout), weight_to_numpy(weight, weight_layout),
                   None if bias is None else bias.detach().numpy(), layout=layout, weight_layout=weight_layout,
                   **geometry)
    return act_from_numpy(y, layout)


@torch.library.custom_op("numbaconv::conv2d", mutates_args=())
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], groups: int, padding_mode: str) -> Tensor:
    """``numbaconv.conv2d`` on tensors (4-D ``x``, explicit ``[top, bottom, left, right]`` padding)."""
    return conv2d_impl(x, weight, bias, geometry(stride, padding, dilation, groups, padding_mode))


def conv2d_out_hw(h, w, kernel_hw, stride, padding, dilation):
    top, bottom, left, right = padding
    return ((h + top + bottom - dilation[0] * (kernel_hw[0] - 1) - 1) // stride[0] + 1,
            (w + left + right - dilation[1] * (kernel_hw[1] - 1) - 1) // stride[1] + 1)


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    ho, wo = conv2d_out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    return _empty(x, (x.shape[0], weight.shape[0], ho, wo), layout_of(x) == "NHWC")


# --- conv2d_backward --------------------------------------------------------------------------
def conv2d_backward_impl(grad_output, x, weight, geometry, output_mask):
    """``(grad_x, grad_weight, grad_bias)`` of :func:`conv2d_impl`, ``None`` where ``output_mask`` is false."""
    need_x, need_w, need_b = (bool(m) for m in output_mask)
    if x.is_cuda:
        from ..cuda.backward import conv2d_backward_cuda  # noqa: PLC0415 -- numba.cuda only on a GPU

        grads = conv2d_backward_cuda(grad_output.detach(), x.detach(), weight.detach(),
                                     need=(need_x, need_w, need_b), **geometry)
        grads = [None if g is None else torch.as_tensor(g, device=x.device) for g in grads]
    else:
        layout = layout_of(x)
        weight_layout = weight_layout_of(weight, layout)
        dx, dw, db = _nc.conv2d_backward(act_to_numpy(grad_output, layout), act_to_numpy(x, layout),
                                         weight_to_numpy(weight, weight_layout), layout=layout,
                                         weight_layout=weight_layout, input_grad=need_x, weight_grad=need_w,
                                         bias_grad=need_b, **geometry)
        grads = [None if dx is None else act_from_numpy(dx, layout),
                 None if dw is None else weight_from_numpy(dw, weight_layout),
                 None if db is None else torch.from_numpy(db)]
    return tuple(grads)


@torch.library.custom_op("numbaconv::conv2d_backward", mutates_args=())
def conv2d_backward(grad_output: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                    dilation: Sequence[int], groups: int, padding_mode: str,
                    output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias)`` of :func:`conv2d`; those ``output_mask`` turns off
    are empty tensors (an operator returns tensors, not ``None``)."""
    grads = conv2d_backward_impl(grad_output, x, weight, geometry(stride, padding, dilation, groups, padding_mode),
                                 output_mask)
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@conv2d_backward.register_fake
def _(grad_output, x, weight, stride, padding, dilation, groups, padding_mode, output_mask):
    layout = layout_of(x)
    need_x, need_w, need_b = output_mask
    return (_empty(x, x.shape, layout == "NHWC") if need_x else x.new_empty(0),
            _empty(weight, weight.shape, weight_layout_of(weight, layout) == "OHWI") if need_w else x.new_empty(0),
            x.new_empty(weight.shape[0]) if need_b else x.new_empty(0))


def _conv2d_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, groups, padding_mode = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation, groups, padding_mode)
    ctx.has_bias = bias is not None


def _grad_mask(ctx):
    return [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]


def _conv2d_grad(ctx, grad_output):
    x, weight = ctx.saved_tensors
    mask = _grad_mask(ctx)
    grads = conv2d_backward(grad_output, x, weight, *ctx.geometry, mask)
    return tuple(g if m else None for g, m in zip(grads, mask)) + (None,) * 5


conv2d.register_autograd(_conv2d_grad, setup_context=_conv2d_setup_context)


# --- conv_transpose2d -------------------------------------------------------------------------
def conv_transpose2d_impl(x, weight, bias, stride, padding, output_padding, dilation, groups):
    """``numbaconv.conv_transpose2d`` on CPU tensors (4-D ``x``)."""
    layout = layout_of(x)
    weight_layout = weight_layout_of(weight, layout)
    y = _nc.conv_transpose2d(act_to_numpy(x, layout), weight_to_numpy(weight, weight_layout),
                             None if bias is None else bias.detach().numpy(), stride=tuple(stride),
                             padding=tuple(padding), output_padding=tuple(output_padding), groups=groups,
                             dilation=tuple(dilation), layout=layout, weight_layout=weight_layout)
    return act_from_numpy(y, layout)


@torch.library.custom_op("numbaconv::conv_transpose2d", mutates_args=(), device_types="cpu")
def conv_transpose2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                     padding: Sequence[int], output_padding: Sequence[int], dilation: Sequence[int],
                     groups: int) -> Tensor:
    """``numbaconv.conv_transpose2d`` on CPU tensors (4-D ``x``)."""
    return conv_transpose2d_impl(x, weight, bias, stride, padding, output_padding, dilation, groups)


def transpose_out_hw(h, w, kernel_hw, stride, padding, output_padding, dilation):
    return tuple((size - 1) * s - 2 * p + d * (k - 1) + op + 1
                 for size, k, s, p, op, d in zip((h, w), kernel_hw, stride, padding, output_padding, dilation))


@conv_transpose2d.register_fake
def _(x, weight, bias, stride, padding, output_padding, dilation, groups):
    ho, wo = transpose_out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, output_padding, dilation)
    return _empty(x, (x.shape[0], weight.shape[1] * groups, ho, wo), layout_of(x) == "NHWC")


def _transpose_setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, output_padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight)
    ctx.geometry = (stride, padding, dilation, groups)
    ctx.has_bias = bias is not None


def _transpose_grad(ctx, grad_output, eager=False):
    """A transposed convolution is the input gradient of a convolution, so its gradients are
    that convolution (for the input) and that convolution's weight gradient (for the weight).
    When ``output_padding >= stride`` (torch allows it below the dilation) the convolution of
    ``grad_output`` has more rows / columns than ``x``: the input gradient drops them, and the
    weight gradient sees them multiplied by zeros."""
    x, weight = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.geometry
    pads = [padding[0], padding[0], padding[1], padding[1]]
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    h, w = x.shape[2], x.shape[3]
    dx = dw = db = None
    if need_x:
        args = (stride, pads, dilation, groups, "zeros")
        dx = (conv2d_impl(grad_output, weight, None, geometry(*args)) if eager
              else conv2d(grad_output, weight, None, *args))
        if dx.shape[2] != h or dx.shape[3] != w:
            dx = dx[:, :, :h, :w]
    if need_w:
        ho, wo = conv2d_out_hw(grad_output.shape[2], grad_output.shape[3], weight.shape[2:], stride, pads, dilation)
        gy = x if (ho, wo) == (h, w) else torch.nn.functional.pad(x, (0, wo - w, 0, ho - h))
        args = (stride, pads, dilation, groups, "zeros")
        dw = (conv2d_backward_impl(gy, grad_output, weight, geometry(*args), [False, True, False]) if eager
              else conv2d_backward(gy, grad_output, weight, *args, [False, True, False]))[1]
    if need_b and ctx.has_bias:
        db = grad_output.sum((0, 2, 3))
    return dx, dw, db, None, None, None, None, None


conv_transpose2d.register_autograd(_transpose_grad, setup_context=_transpose_setup_context)


# --- conv2d_fused (inference) -------------------------------------------------------------------
@torch.library.custom_op("numbaconv::conv2d_fused", mutates_args=(), device_types="cpu")
def conv2d_fused(x: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], groups: int, padding_mode: str,
                 activation: str) -> Tensor:
    """``activation(conv2d + bias + residual)`` with the epilogue in the kernels' stores
    (``activation`` ``""`` for none): what :class:`~numbaconv.torch.FusedConv2d` runs when
    compiled or exported.  Inference only (no autograd formula)."""
    ra = None if residual is None else act_to_numpy(residual, layout_of(x))
    return conv2d_impl(x, weight, bias, dict(geometry(stride, padding, dilation, groups, padding_mode),
                                             activation=activation or None, residual=ra))


@conv2d_fused.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, padding_mode, activation):
    ho, wo = conv2d_out_hw(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    return _empty(x, (x.shape[0], weight.shape[0], ho, wo), layout_of(x) == "NHWC")


# --- eager calls: the same kernels without the dispatcher ------------------------------------
# Through torch's dispatcher a Python custom operator costs ~50 us a call more than an
# autograd.Function (two crossings into Python, measured by scripts/torch_overhead.py), a
# lot on small layers.  Plain eager calls on plain tensors therefore run the implementations
# above through autograd.Functions; anything that traces (Dynamo, export, jit.trace, make_fx
# and other dispatch / function modes) or passes tensor subclasses gets the operators.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors):
    """Plain eager call on plain tensors: nothing traces it, the kernels may run directly."""
    if torch.compiler.is_compiling():  # (first: Dynamo may not look at the mode stacks)
        return False
    # (torch._C's checks, not their Python wrappers, and a loop, not all(<generator>): this
    # runs on every layer of a converted model, ~2.4 -> ~1 us on Zen 1)
    if _is_tracing() or _dispatch_stack() != 0 or _function_mode():
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


_is_tracing = torch._C._is_tracing
_dispatch_stack = torch._C._len_torch_dispatch_stack
_function_mode = torch._C._is_torch_function_mode_enabled


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, geometry):
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        ctx.has_bias = bias is not None
        return conv2d_impl(x, weight, bias, geometry)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        return conv2d_backward_impl(grad_output, x, weight, ctx.geometry, _grad_mask(ctx)) + (None,)


class _ConvTranspose2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        _transpose_setup_context(ctx, inputs, None)
        return conv_transpose2d_impl(*inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        return _transpose_grad(ctx, grad_output, eager=True)


def run_conv2d(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """:func:`conv2d`'s result: the operator when traced, else the same kernels directly."""
    if not eager(x, weight, bias):
        return conv2d(x, weight, bias, stride, padding, dilation, groups, padding_mode)
    g = geometry(stride, padding, dilation, groups, padding_mode)
    return _Conv2dFunction.apply(x, weight, bias, g) if _needs_grad(x, weight, bias) else conv2d_impl(x, weight, bias, g)


def run_conv_transpose2d(x, weight, bias, stride, padding, output_padding, dilation, groups):
    """:func:`conv_transpose2d`'s result, as :func:`run_conv2d` chooses."""
    args = (x, weight, bias, stride, padding, output_padding, dilation, groups)
    if not eager(x, weight, bias):
        return conv_transpose2d(*args)
    if _needs_grad(x, weight, bias):
        return _ConvTranspose2dFunction.apply(*args)
    return conv_transpose2d_impl(*args)
