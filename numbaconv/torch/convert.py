"""Inference: :func:`convert` puts a whole model on numbaconv; :class:`FusedConv2d` is the
eval-mode layer it builds (BatchNorm folded, residual add and activation fused, a
:class:`numbaconv.Conv2dPlan` per memory format, no autograd bookkeeping)."""

import copy
import operator
from typing import NamedTuple

import numpy as np
import torch
import torch.fx

import numbaconv as _nc

from . import ops
from .functional import HOST_DTYPES, resolve
from .modules import Conv2d, ConvTranspose2d, module_padding
from .ops import act_from_numpy, act_to_numpy, layout_of

__all__ = ["convert", "FusedConv2d"]

def _geometry(stride, padding, dilation, groups, padding_mode):
    if isinstance(padding, list):
        padding = tuple(tuple(p) if isinstance(p, list) else p for p in padding)
    return dict(stride=tuple(stride) if isinstance(stride, list) else stride, padding=padding,
                dilation=tuple(dilation) if isinstance(dilation, list) else dilation,
                groups=groups, padding_mode=padding_mode)


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


class _Fast(NamedTuple):
    """What :meth:`FusedConv2d.forward` checks and runs for a call like the last one."""

    shape: torch.Size
    stride: tuple
    dtype: torch.dtype
    weight: torch.Tensor
    weight_version: int
    bias: object
    bias_version: object
    out_shape: torch.Size
    out_stride: tuple
    run: object  # Conv2dPlan._launcher's
    out_array_shape: tuple
    out_dtype: np.dtype
    layout: str


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
        self.geometry = _geometry(conv.stride, module_padding(conv), conv.dilation, conv.groups, conv.padding_mode)
        self.folded_batchnorm = bn is not None
        self._plans = {}
        self._fast = None

    def extra_repr(self):
        return (f"{self.weight.shape[1] * self.geometry['groups']}, {self.weight.shape[0]}, "
                f"kernel_size={tuple(self.weight.shape[2:])}, batchnorm_folded={self.folded_batchnorm}, "
                f"activation={self.activation!r}")

    def _plan(self, layout, w, b):
        """The plan of the weights ``w`` and bias ``b`` (this module's buffers) for ``layout``,
        made again when a buffer was replaced (``.to()``, assignment) or changed in place
        (its version counter)."""
        plan = self._plans.get(layout)
        if (plan is None or plan[0] is not w or plan[1] != w._version or plan[2] is not b
                or (b is not None and plan[3] != b._version)):
            plan = (w, w._version, b, None if b is None else b._version,
                    _nc.Conv2dPlan(w.detach().numpy(), None if b is None else b.detach().numpy(), layout=layout,
                                   weight_layout="OIHW", activation=self.activation, **self.geometry))
            self._plans[layout] = plan
            self._fast = None
        return plan[4]

    def __getstate__(self):
        # (plans hold locks and compiled launches: copies and pickles make their own)
        state = self.__dict__.copy()
        state["_plans"], state["_fast"] = {}, None
        return state

    def forward(self, x, residual=None):
        # the common inference call, input (and residual) of the same shape, strides and type
        # as the last call's: straight to the plan's launch (the checks of _forward, the plan's
        # and the conversions cost 1.4-3 ms of MobileNetV2's ~24 and EfficientNet-B0's ~46 on Zen 1)
        fast = self._fast
        buffers = self._buffers
        # (compiling first: Dynamo then prunes the rest instead of tracing these checks)
        if (not torch.compiler.is_compiling() and fast is not None and type(x) is torch.Tensor
                and x.shape == fast.shape and x.stride() == fast.stride
                and x.dtype is fast.dtype and x.is_cpu and not x.requires_grad
                and buffers["weight"] is fast.weight and fast.weight._version == fast.weight_version
                and buffers["bias"] is fast.bias and (fast.bias is None or fast.bias._version == fast.bias_version)
                and (residual is None or (type(residual) is torch.Tensor and residual.shape == fast.out_shape
                                          and residual.stride() == fast.out_stride and residual.dtype is x.dtype
                                          and residual.is_cpu and not residual.requires_grad))
                and ops.eager(x, residual)):
            out = np.empty(fast.out_array_shape, dtype=fast.out_dtype)
            fast.run(act_to_numpy(x, fast.layout), out,
                     None if residual is None else act_to_numpy(residual, fast.layout))
            return act_from_numpy(out, fast.layout)
        return self._forward(x, residual)

    def _forward(self, x, residual):
        # (the buffers from their dict: each ``self.weight`` is a Python-level Module.__getattr__,
        # ~3 us on Zen 1, and this runs for every layer of a converted model)
        buffers = self._buffers
        w = buffers["weight"]
        if x.device.type != "cpu" or x.dtype is not w.dtype or x.dtype not in HOST_DTYPES:
            return self._torch_forward(x, residual)
        if not ops.eager(x, residual):
            return self._operator_forward(x, residual)
        layout = layout_of(x)
        plan = self._plan(layout, w, buffers["bias"])
        unbatched = x.dim() == 3
        xa = act_to_numpy(x.unsqueeze(0) if unbatched else x, layout)
        ra = None
        if residual is not None:
            r4 = residual.unsqueeze(0) if unbatched and residual.dim() == 3 else residual
            ra = act_to_numpy(r4, layout) if (r4.dim() == 4 and r4.dtype == x.dtype
                                               and r4.device.type == "cpu") else None
            if ra is None or ra.shape != plan.out_shape(xa):
                return self._torch_forward(x, residual)  # a broadcasting add: torch's ops
        y = act_from_numpy(plan(xa, residual=ra), layout)
        if unbatched:
            return y.squeeze(0)
        if not x.requires_grad:
            fast = plan._launcher(xa)
            if fast is not None:  # (the next call like this one takes the path in forward)
                b = buffers["bias"]
                self._fast = _Fast(x.shape, x.stride(), x.dtype, w, w._version, b, None if b is None else b._version,
                                   y.shape, y.stride(), *fast, layout)
        return y

    def _operator_forward(self, x, residual):
        """Traced (torch.compile, export): one ``numbaconv::conv2d_fused`` operator (no plan: the
        prepared weights come from numbaconv's cache, checked bit for bit)."""
        x4, unbatched = (x.unsqueeze(0), True) if x.dim() == 3 else (x, False)
        g = self.geometry
        stride, pads, dilation, groups = resolve(x4, self.weight, g["stride"], g["padding"], g["dilation"],
                                                 g["groups"], g["padding_mode"])
        r4 = None
        if residual is not None:
            r4 = residual.unsqueeze(0) if unbatched and residual.dim() == 3 else residual
            ho, wo = ops.conv2d_out_hw(x4.shape[2], x4.shape[3], self.weight.shape[2:], stride, pads, dilation)
            if (r4.dtype != x.dtype or r4.device.type != "cpu"
                    or tuple(r4.shape) != (x4.shape[0], self.weight.shape[0], ho, wo)):
                return self._torch_forward(x, residual)  # a broadcasting add: torch's ops
        y = ops.conv2d_fused(x4, self.weight, self.bias, r4, stride, pads, dilation, groups, g["padding_mode"],
                             self.activation or "")
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
    """``model`` with every ``torch.nn.Conv2d`` and ``ConvTranspose2d`` running on numbaconv (see SPEC.md).

    In ``eval()`` mode the module graph is traced (``torch.fx``): a ``BatchNorm2d`` that
    follows a convolution is folded into it, and a following residual addition and ReLU /
    ReLU6 / SiLU / Hardswish are fused into its epilogue; each convolution becomes a
    :class:`FusedConv2d` (a :class:`numbaconv.Conv2dPlan` per memory format) and the result
    is a ``torch.fx.GraphModule``; ``ConvTranspose2d`` layers become :class:`ConvTranspose2d`.
    In ``train()`` mode, or when the model cannot be traced, the ``Conv2d`` and
    ``ConvTranspose2d`` modules become numbaconv's (same parameters, numbaconv's forward and
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
    return _swap(gm)  # the transposed convolutions (decoders, U-Nets): no fusion, numbaconv's module


_SWAPS = {torch.nn.Conv2d: Conv2d, torch.nn.ConvTranspose2d: ConvTranspose2d}


def _swap(model):
    """Every plain ``torch.nn.Conv2d`` / ``ConvTranspose2d`` becomes numbaconv's :class:`Conv2d` /
    :class:`ConvTranspose2d` (same parameters and state: a class change, nothing copied)."""
    for module in model.modules():  # (the model itself included)
        if type(module) in _SWAPS:
            module.__class__ = _SWAPS[type(module)]
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
