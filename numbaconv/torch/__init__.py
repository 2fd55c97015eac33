"""PyTorch bridge: numbaconv's forward and backward inside ``torch.autograd``.

This module imports torch (``import numbaconv`` never does; only ``import numbaconv.torch``
does).  It offers:

* :func:`conv2d` -- ``torch.nn.functional.conv2d``'s signature (plus ``padding_mode``), as a
  :class:`torch.autograd.Function` whose forward is :func:`numbaconv.conv2d` and whose
  backward is :func:`numbaconv.conv2d_backward`;
* :class:`Conv2d` -- a drop-in subclass of :class:`torch.nn.Conv2d` (same constructor,
  parameters, ``state_dict``, ``padding_mode``, ``padding="same"/"valid"``) whose
  convolution runs through :func:`conv2d`;
* :func:`convert` -- a whole model on numbaconv: for inference, BatchNorm folded and the
  following residual add / activation fused into :class:`FusedConv2d` modules, each a
  :class:`numbaconv.Conv2dPlan` per memory format; for training, the plain module swap.

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

import copy
import operator

import torch
import torch.fx
from torch.autograd.function import once_differentiable

import numbaconv as _nc

__all__ = ["conv2d", "convert", "Conv2d", "Conv2dFunction", "FusedConv2d"]

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


def _module_padding(conv):
    """A ``torch.nn.Conv2d``'s padding as numbaconv takes it: ``conv.padding``, or for the
    non-zero modes the padding torch materialises, ``(left, right, top, bottom)`` reversed."""
    if conv.padding_mode == "zeros":
        return conv.padding
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    return (top, bottom), (left, right)


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
        return conv2d(input, weight, bias, self.stride, _module_padding(self), self.dilation, self.groups,
                      padding_mode=self.padding_mode)

    @staticmethod
    def _numbaconv_can_run(input, weight):
        if input.dtype not in _HOST_DTYPES or weight.dtype != input.dtype:
            return False
        if input.device.type == "cpu" and weight.device.type == "cpu":
            return True
        return input.is_cuda and "cuda" in _nc.algorithms()


# --- inference: numbaconv.torch.convert ----------------------------------------------------
_ACTIVATION_MODULES = {torch.nn.ReLU: "relu", torch.nn.ReLU6: "relu6", torch.nn.SiLU: "silu",
                       torch.nn.Hardswish: "hardswish"}
_ACTIVATION_FUNCTIONS = {torch.relu: "relu", torch.nn.functional.relu: "relu", torch.relu_: "relu",
                         torch.nn.functional.relu6: "relu6", torch.nn.functional.silu: "silu",
                         torch.nn.functional.hardswish: "hardswish"}
_TORCH_ACTIVATIONS = {None: lambda t: t, "relu": torch.relu, "relu6": torch.nn.functional.relu6,
                      "silu": torch.nn.functional.silu, "hardswish": torch.nn.functional.hardswish}


def _fold(conv, bn):
    """``conv`` 's weight and bias with ``bn`` (eval statistics) folded in, computed in float64."""
    w = conv.weight.detach().to(torch.float64)
    b = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        scale = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(b)
        shift = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(b)
        scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * scale.reshape(-1, 1, 1, 1)
        b = (b - bn.running_mean.double()) * scale + shift
    elif conv.bias is None:
        return w.to(conv.weight.dtype), None
    return w.to(conv.weight.dtype), b.to(conv.weight.dtype)


class FusedConv2d(torch.nn.Module):
    """Inference form of ``Conv2d`` (+ folded ``BatchNorm2d``) (+ residual add) (+ activation)
    that :func:`convert` puts in eval-mode models: ``forward(x, residual=None)`` runs a
    :class:`numbaconv.Conv2dPlan` per memory format (weights prepared once, epilogue fused),
    with no autograd bookkeeping.  The folded weights are buffers, not parameters: convert
    the trained model again after changing it.  Inputs numbaconv cannot take (other devices
    or dtypes) run torch's ops instead; a residual of another shape is added by torch."""

    def __init__(self, conv, bn=None, activation=None):
        super().__init__()
        weight, bias = _fold(conv, bn)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.activation = activation
        self.geometry = _geometry(conv.stride, _module_padding(conv), conv.dilation, conv.groups, conv.padding_mode)
        self.folded_batchnorm = bn is not None
        self._plans = {}

    def extra_repr(self):
        return (f"{self.weight.shape[1] * self.geometry['groups']}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, batchnorm_folded={self.folded_batchnorm}, "
                f"activation={self.activation!r}")

    def _plan(self, layout):
        w, b = self.weight, self.bias
        key = (layout, w.dtype, w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        plan = self._plans.get(layout)
        if plan is None or plan[0] != key:
            plan = (key, _nc.Conv2dPlan(w.detach().numpy(), None if b is None else b.detach().numpy(),
                                        layout=layout, weight_layout="OIHW", activation=self.activation,
                                        **self.geometry))
            self._plans[layout] = plan
        return plan[1]

    def forward(self, x, residual=None):
        if x.device.type != "cpu" or x.dtype not in _HOST_DTYPES or self.weight.dtype != x.dtype:
            return self._torch_forward(x, residual)
        layout = "NHWC" if x.dim() == 4 and _is_channels_last(x) else "NCHW"
        plan = self._plan(layout)
        unbatched = x.dim() == 3
        xa = _act_to_numpy(x.unsqueeze(0) if unbatched else x, layout)
        ra = None
        if residual is not None:
            r4 = residual.unsqueeze(0) if unbatched and residual.dim() == 3 else residual
            ra = _act_to_numpy(r4, layout) if (r4.dim() == 4 and r4.dtype == x.dtype
                                               and r4.device.type == "cpu") else None
            if ra is None or ra.shape != plan.out_shape(xa):
                return self._torch_forward(x, residual)  # a broadcasting add: torch's ops
        y = _act_from_numpy(plan(xa, residual=ra), layout)
        return y.squeeze(0) if unbatched else y

    def _torch_forward(self, x, residual):
        g = self.geometry
        pad = g["padding"]
        if isinstance(pad, tuple) and pad and isinstance(pad[0], tuple):  # explicit or non-zero modes
            (top, bottom), (left, right) = pad
            mode = "constant" if g["padding_mode"] == "zeros" else g["padding_mode"]
            x, pad = torch.nn.functional.pad(x, (left, right, top, bottom), mode=mode), 0
        b = None if self.bias is None else self.bias.to(x.dtype)
        y = torch.nn.functional.conv2d(x, self.weight.to(x.dtype), b, g["stride"], pad, g["dilation"], g["groups"])
        if residual is not None:
            y = y + residual
        return _TORCH_ACTIVATIONS[self.activation](y)


def convert(model, *, inplace=False):
    """``model`` with every ``torch.nn.Conv2d`` running on numbaconv (see SPEC.md).

    In ``eval()`` mode the module graph is traced (``torch.fx``): a ``BatchNorm2d`` that
    follows a convolution is folded into it, and a following residual addition and ReLU /
    ReLU6 / SiLU / Hardswish are fused into its epilogue; each convolution becomes a
    :class:`FusedConv2d` (a :class:`numbaconv.Conv2dPlan` per memory format) and the result
    is a ``torch.fx.GraphModule``.  In ``train()`` mode, or when the model cannot be traced,
    the ``Conv2d`` modules become :class:`Conv2d` (same parameters, numbaconv's forward and
    backward; gradients flow as before).  ``inplace=False`` leaves ``model`` unchanged.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if model.training:
        return _swap(model)
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 -- data-dependent control flow and the like: swap only
        return _swap(model)
    _fuse(gm)
    return gm


def _swap(model):
    """Every plain ``torch.nn.Conv2d`` becomes :class:`Conv2d` (its parameters kept)."""
    for module in model.modules():  # (the model itself included)
        if type(module) is torch.nn.Conv2d:
            module.__class__ = Conv2d
    return model


def _fuse(gm):
    modules = dict(gm.named_modules())

    def module_of(node, types):
        return node.op == "call_module" and isinstance(modules.get(node.target), types)

    def only_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def activation_of(node):
        if node is None:
            return None
        if node.op == "call_module" and type(modules.get(node.target)) in _ACTIVATION_MODULES:
            return _ACTIVATION_MODULES[type(modules[node.target])]
        if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS and len(node.args) == 1:
            return _ACTIVATION_FUNCTIONS[node.target]
        return None

    def residual_of(node, value):
        """The other operand when ``node`` is ``value + other`` (either order), else None."""
        if node is None or node.kwargs or len(node.args) != 2:
            return None
        if not (node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)):
            return None
        a, b = node.args
        other = b if a is value else a if b is value else None
        return other if isinstance(other, torch.fx.Node) and other is not value else None

    count = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_module" and type(modules.get(node.target)) in (torch.nn.Conv2d, Conv2d)):
            continue
        conv = modules[node.target]
        chain, bn, residual, activation = [node], None, None, None
        nxt = only_user(node)
        if (nxt is not None and module_of(nxt, torch.nn.BatchNorm2d) and modules[nxt.target].track_running_stats
                and modules[nxt.target].running_mean is not None
                and modules[nxt.target].num_features == conv.out_channels):
            bn = modules[nxt.target]
            chain.append(nxt)
        nxt = only_user(chain[-1])
        other = residual_of(nxt, chain[-1])
        if other is not None:
            residual = other
            chain.append(nxt)
        nxt = only_user(chain[-1])
        activation = activation_of(nxt)
        if activation is not None:
            chain.append(nxt)
        name = f"numbaconv_{count}_{node.target.replace('.', '_')}"
        count += 1
        gm.add_submodule(name, FusedConv2d(conv, bn, activation))
        last = chain[-1]
        with gm.graph.inserting_before(last):
            args = (node.args[0],) if residual is None else (node.args[0], residual)
            fused = gm.graph.call_module(name, args)
        last.replace_all_uses_with(fused)
        for n in reversed(chain):
            gm.graph.erase_node(n)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
