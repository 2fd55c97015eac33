"""Inference: :func:`convert` puts a whole model on numbaconv; :class:`FusedConv2d` is the
eval-mode layer it builds (BatchNorm folded, residual add and activation fused, a
:class:`numbaconv.Conv2dPlan` per memory format, no autograd bookkeeping)."""

import copy
import functools
import operator
import threading
from typing import NamedTuple

import numpy as np
import torch
import torch.fx

import numbaconv as _nc

from .. import ahead
from ..cpu import pool as _pool
from . import ops
from .functional import HOST_DTYPES, resolve
from .modules import Conv2d, ConvTranspose2d, module_padding
from .ops import act_from_numpy, act_to_numpy, is_channels_last, layout_of

__all__ = ["convert", "FusedConv2d", "ConvChain", "MaxPool2d"]

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
            if x.device.type == "meta":
                return self._meta_forward(x, residual)
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

    def _meta_forward(self, x, residual):
        """Shapes only (torch's meta device, :func:`_first_forward`'s pass): the layer recorded
        as its plan will run it, the result in the input's memory format as numbaconv's is."""
        x4 = x.unsqueeze(0) if x.dim() == 3 else x
        if _recording is not None and x4.dim() == 4 and x.dtype is self.weight.dtype and x.dtype in HOST_DTYPES:
            _recording.append(dict(x_shape=tuple(x4.shape), layout="NHWC" if is_channels_last(x4) else "NCHW",
                                   dtype=str(x.dtype).rsplit(".", 1)[-1], w_shape=tuple(self.weight.shape),
                                   bias=self.bias is not None, activation=self.activation,
                                   residual=residual is not None, geometry=dict(self.geometry)))
        y = self._torch_forward(x, residual, self.weight.to("meta"), None if self.bias is None else self.bias.to("meta"))
        return y.contiguous(memory_format=torch.channels_last) if is_channels_last(x4) and y.dim() == 4 else y

    def _torch_forward(self, x, residual, weight=None, bias=None):
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        g = self.geometry
        pad = g["padding"]
        if isinstance(pad, tuple) and pad and isinstance(pad[0], tuple):  # explicit or non-zero modes
            (top, bottom), (left, right) = pad
            mode = "constant" if g["padding_mode"] == "zeros" else g["padding_mode"]
            x, pad = torch.nn.functional.pad(x, (left, right, top, bottom), mode=mode), 0
        b = None if bias is None else bias.to(x.dtype)
        y = torch.nn.functional.conv2d(x, weight.to(x.dtype), b, g["stride"], pad, g["dilation"], g["groups"])
        if residual is not None:
            y = y + residual
        return _TORCH_ACTIVATIONS[self.activation](y)


class ConvChain(torch.nn.Module):
    """Consecutive :class:`FusedConv2d` layers of a converted model (a MobileNet's or ResNet's
    body), run as one step: ``forward(*inputs)`` returns the layers' outputs that the rest of
    the model uses (one tensor, or a tuple).

    Why: each layer called as a module (torch's ``__call__``, the layer's checks, tensor <->
    NumPy views, a fresh output) cost more than MobileNetV2's small layers themselves: Zen 3,
    batch 1, 52 layers in 15-16 ms through the modules against 11.5-12.3 ms with their plans'
    launches called back to back (onnxruntime: 7-9 ms).  So after a first call through the
    layers (which prepares each layer's launch), a call with inputs of the same shapes,
    strides and dtypes runs a *program*: the launches in order, the layers' checks once per
    call (each layer's weights and bias unchanged -- same tensors, same versions -- and no
    hooks on it or globally), and the intermediate results in a few buffers the program
    keeps and reuses as soon as the last layer reading one is done (most recently freed
    first: its lines are still in cache), as onnxruntime's memory planner does, up to
    :attr:`MAX_BUFFER_BYTES` a program (beyond: fresh arrays per call, as the layers make).
    Only the outputs that leave the chain are fresh arrays.  Anything else -- tracing, other devices
    or dtypes, inputs that need grad, a changed layer, hooks, a second thread while one runs
    the program -- goes through the layers as modules, as before.
    """

    #: programs kept per chain (one per input signature; each holds its buffers)
    MAX_PROGRAMS = 4
    #: a program whose buffers would hold more than this (large batches or images) keeps none:
    #: its intermediate results are fresh arrays, freed after the call, as through the layers
    MAX_BUFFER_BYTES = 256 << 20

    def __init__(self, layers, wiring, outputs):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        #: per layer ``(source, residual)``: ``j >= 0`` layer ``j``'s output, ``j < 0`` input
        #: ``-1 - j``; ``residual`` None for none
        self.wiring = tuple(wiring)
        self.outputs = tuple(outputs)  # the layers whose outputs the model uses after the chain
        self._programs = {}
        self._lock = threading.Lock()

    def extra_repr(self):
        return f"{len(self.layers)} layers, outputs {list(self.outputs)}"

    def __getstate__(self):
        # (programs hold buffers and launches, the lock cannot be pickled: copies make their own)
        state = self.__dict__.copy()
        state["_programs"] = {}
        del state["_lock"]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._lock = threading.Lock()

    def forward(self, *xs):
        if not torch.compiler.is_compiling():  # (first: Dynamo then prunes the program path)
            key = tuple((x.shape, x.stride(), x.dtype) if type(x) is torch.Tensor else None for x in xs)
            program = self._programs.get(key)
            if program is not None and self._lock.acquire(blocking=False):
                try:
                    ys = program(xs)
                finally:
                    self._lock.release()
                if ys is _STALE:  # a layer's weights changed: its plan is remade below, then the program
                    program = None
                elif ys is not None:
                    return ys
            ys = self._through_layers(xs)
            if program is None and _plain_cpu(xs):
                if len(self._programs) >= self.MAX_PROGRAMS:
                    self._programs.clear()
                self._programs[key] = _program(self, xs) or _no_program
            return ys
        return self._through_layers(xs)

    def _through_layers(self, xs):
        values = []
        for layer, (src, res) in zip(self.layers, self.wiring):
            x = xs[-1 - src] if src < 0 else values[src]
            if res is None:
                values.append(layer(x))
            else:
                values.append(layer(x, xs[-1 - res] if res < 0 else values[res]))
        if len(self.outputs) == 1:
            return values[self.outputs[0]]
        return tuple(values[j] for j in self.outputs)


#: what a program returns when a layer's weights or bias changed since it was made
_STALE = object()


def _plain_cpu(xs):
    """Whether a chain's inputs are plain CPU tensors outside autograd in an eager call: what a
    program is made for and runs on."""
    for x in xs:
        if type(x) is not torch.Tensor or not x.is_cpu or x.requires_grad:
            return False
    return ops.eager(*xs)


def _no_program(xs):
    """The program of inputs a chain cannot run as one (every call goes through the layers)."""
    return None


def _program(chain, xs):
    """The program that runs ``chain`` on inputs like ``xs`` (its layers' launches as the call
    through them just prepared them), or None where a layer has no launch for them or the
    layers' layouts and shapes do not chain."""
    layers, fasts = list(chain.layers), [m._fast for m in chain.layers]
    if any(f is None for f in fasts) or len(set(map(id, layers))) != len(layers):
        return None
    in_layouts = [None] * len(xs)

    def source_ok(j, shape, stride, dtype, layout):
        """Whether value ``j`` (as :attr:`ConvChain.wiring` numbers it) is what a layer's launch
        was prepared for: a tensor of ``shape``, ``stride``, ``dtype`` in ``layout``."""
        if j >= 0:
            f = fasts[j]
            return (f.out_shape, f.out_stride, f.dtype, f.layout) == (shape, stride, dtype, layout)
        x = xs[-1 - j]
        if in_layouts[-1 - j] not in (None, layout):
            return False
        in_layouts[-1 - j] = layout
        return type(x) is torch.Tensor and (x.shape, x.stride(), x.dtype) == (shape, stride, dtype)

    for f, (src, res) in zip(fasts, chain.wiring):
        if not source_ok(src, f.shape, f.stride, f.dtype, f.layout):
            return None
        if res is not None and not source_ok(res, f.out_shape, f.out_stride, f.dtype, f.layout):
            return None
    # buffers for the values that stay inside the chain: each layer's result goes to a free
    # buffer (the most recently freed that is large enough), and a buffer is free again once
    # the last layer reading its value has run (not before the reader's own result is placed:
    # a launch's output must not overlap its inputs)
    escaping = set(chain.outputs)
    last_use = {}
    for k, (src, res) in enumerate(chain.wiring):
        for j in (src, res):
            if j is not None and j >= 0:
                last_use[j] = k
    free, held, views = [], {}, []
    for k, f in enumerate(fasts):
        view = None
        if k not in escaping and k in last_use:
            size = int(np.prod(f.out_array_shape))
            fits = [i for i, b in enumerate(free) if b.size >= size]
            buf = free.pop(fits[-1]) if fits else np.empty(size, f.out_dtype)
            held[k] = buf
            view = buf[:size].reshape(f.out_array_shape)
        views.append(view)
        for j in [j for j in held if last_use[j] <= k and j != k]:
            free.append(held.pop(j))
    kept = sum(b.nbytes for b in free) + sum(b.nbytes for b in held.values())
    if kept > chain.MAX_BUFFER_BYTES:
        views, kept = [None] * len(fasts), 0
    steps = [(f.run, src, res, view, f.out_array_shape, f.out_dtype)
             for f, (src, res), view in zip(fasts, chain.wiring, views)]
    outputs = [(j, fasts[j].layout) for j in chain.outputs]
    checks = [(m, m._buffers, f.weight, f.weight_version, f.bias, f.bias_version) for m, f in zip(layers, fasts)]
    single = len(outputs) == 1
    hooks = torch.nn.modules.module

    def program(xs):
        if not _plain_cpu(xs) or hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
            return None
        for m, buffers, w, wv, b, bv in checks:  # the layers as the program was made
            if m._forward_hooks or m._forward_pre_hooks:
                return None
            if (buffers["weight"] is not w or w._version != wv or buffers["bias"] is not b
                    or (b is not None and b._version != bv)):
                return _STALE
        ins = [act_to_numpy(x, layout) for x, layout in zip(xs, in_layouts)]
        values = []
        for run, src, res, view, shape, dtype in steps:
            out = np.empty(shape, dtype) if view is None else view
            run(ins[-1 - src] if src < 0 else values[src], out,
                None if res is None else ins[-1 - res] if res < 0 else values[res])
            values.append(out)
        if single:
            return act_from_numpy(values[outputs[0][0]], outputs[0][1])
        return tuple(act_from_numpy(values[j], layout) for j, layout in outputs)
    program.kept_bytes = kept  # (the buffers it holds between calls)
    return program


class MaxPool2d(torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` as :func:`convert` leaves it in eval-mode models: numbaconv's
    kernel (:mod:`numbaconv.cpu.pool`) for plain CPU float32 / float64 4-D tensors outside
    autograd, torch's own ``forward`` for everything else (other devices and dtypes,
    gradients, tracing, 3-D inputs, arguments torch rejects -- it raises its own error).

    Why: torch's eager NCHW kernel took 2.8-3.2 ms for ResNet's stem pool (1x64x112x112,
    3x3, stride 2; Intel Xeon, 2 threads) -- 15 % of a converted ResNet-18's forward --
    where this one takes 0.16 ms (channels-last: torch 0.23, this 0.14)."""

    def _args(self):
        """``(kernel, stride, padding, dilation)`` as ``(h, w)`` pairs, or None where torch
        would reject them (left to torch's forward, which raises)."""
        pair = torch.nn.modules.utils._pair
        k, p, d = pair(self.kernel_size), pair(self.padding), pair(self.dilation)
        s = pair(self.stride) if self.stride not in (None, (), []) else k
        ints = all(type(v) is int for v in (*k, *s, *p, *d))
        if (self.return_indices or not ints or min(*k, *s, *d) < 1 or min(p) < 0
                or p[0] > k[0] // 2 or p[1] > k[1] // 2):
            return None
        return k, s, p, d

    def forward(self, x):
        # (compiling first: Dynamo then prunes the rest and traces torch's forward)
        if (not torch.compiler.is_compiling() and type(x) is torch.Tensor and x.dim() == 4
                and x.dtype in HOST_DTYPES and x.device.type == "cpu"
                and not (x.requires_grad and torch.is_grad_enabled()) and ops.eager(x)):
            args = self._args()
            layout = layout_of(x)
            xa = act_to_numpy(x, layout)
            if args is not None and xa.flags.c_contiguous:
                (kh, kw), (sh, sw), (ph, pw), (dh, dw) = args
                h, w = (xa.shape[2], xa.shape[3]) if layout == "NCHW" else (xa.shape[1], xa.shape[2])
                if (_pool.out_size(h, kh, sh, ph, dh, self.ceil_mode) > 0
                        and _pool.out_size(w, kw, sw, pw, dw, self.ceil_mode) > 0):
                    return act_from_numpy(_pool.max_pool2d(xa, *args, self.ceil_mode, layout), layout)
        return super().forward(x)


def convert(model, *, inplace=False):
    """``model`` with every ``torch.nn.Conv2d`` and ``ConvTranspose2d`` running on numbaconv (see SPEC.md).

    In ``eval()`` mode the module graph is traced (``torch.fx``): a ``BatchNorm2d`` that
    follows a convolution is folded into it, and a following residual addition and ReLU /
    ReLU6 / SiLU / Hardswish are fused into its epilogue; each convolution becomes a
    :class:`FusedConv2d` (a :class:`numbaconv.Conv2dPlan` per memory format) and the result
    is a ``torch.fx.GraphModule``; ``ConvTranspose2d`` layers become :class:`ConvTranspose2d`,
    and ``MaxPool2d`` layers :class:`MaxPool2d` (numbaconv's pooling kernel; torch's NCHW one
    was 15 % of ResNet-18's forward).  In ``train()`` mode, or when the model cannot be traced, the ``Conv2d`` and
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
        return _swap(_swap(model), _POOL_SWAPS)
    _drop_identities(gm)
    _fuse(gm)
    _chain(gm)
    gm.graph.lint()  # (once, after the three passes: each only edits the graph)
    gm.delete_all_unused_submodules()
    gm.recompile()
    _swap(gm)  # the transposed convolutions (decoders, U-Nets): no fusion, numbaconv's module
    _swap(gm, _POOL_SWAPS)  # (after tracing: fx traces into modules outside torch.nn)
    gm.register_forward_pre_hook(_first_forward, with_kwargs=True)
    gm.register_forward_hook(_after_first_forward, with_kwargs=True, always_call=True)
    return gm


#: the layers :meth:`FusedConv2d._meta_forward` records (None: not recording)
_recording = None


def _first_forward(model, args, kwargs):
    """A converted model's first forward: armed for compiling ahead in the background should
    the cache turn out cold (:mod:`numbaconv.ahead`: the forward then compiles front to back
    while a second process compiles the layers :func:`_record` finds, from the other end).
    Then the hooks are gone."""
    if torch.compiler.is_compiling():
        return None
    _drop_hook(model._forward_pre_hooks, _first_forward, model._forward_pre_hooks_with_kwargs)
    tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    if tensors and all(t.device.type == "cpu" for t in tensors):  # (arm checks ahead.enabled)
        ahead.arm(functools.partial(_record, model, args, kwargs))
    return None


def _record(model, args, kwargs):
    """The layers ``model(*args, **kwargs)`` runs, as its plans will run them (for
    :func:`numbaconv.ahead._run_layer`): one pass on torch's meta device, shapes only (30-150
    ms; run only when something compiles).  Up to the first op the meta pass cannot run."""
    global _recording
    try:
        _recording = []
        meta = torch.utils._pytree.tree_map(lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a,
                                            (args, kwargs))
        state = {name: t.to("meta") for name, t in (*model.named_parameters(), *model.named_buffers())}
        with torch.no_grad():
            torch.func.functional_call(model, state, meta[0], meta[1])
    except Exception:  # noqa: BLE001 -- an op the meta pass cannot run: the layers recorded up to it
        pass
    finally:
        recorded, _recording = _recording, None
    return recorded


def _after_first_forward(model, args, kwargs, output):
    """After the first forward (also when it raised): every kernel it needed is compiled, so
    the background process, if any, is stopped."""
    if torch.compiler.is_compiling() or _recording is not None:  # (the meta pass's own call)
        return None
    _drop_hook(model._forward_hooks, _after_first_forward, model._forward_hooks_with_kwargs,
               model._forward_hooks_always_called)
    ahead.disarm()
    return None


def _drop_hook(hooks, fn, *extra):
    for key, hook in list(hooks.items()):
        if hook is fn:
            del hooks[key]
            for d in extra:
                d.pop(key, None)


_SWAPS = {torch.nn.Conv2d: Conv2d, torch.nn.ConvTranspose2d: ConvTranspose2d}


#: eval mode only: the pooling module computes no gradients of its own
_POOL_SWAPS = {torch.nn.MaxPool2d: MaxPool2d}


def _swap(model, swaps=_SWAPS):
    """Every module of a type in ``swaps`` (by default plain ``torch.nn.Conv2d`` /
    ``ConvTranspose2d``) becomes numbaconv's (:class:`Conv2d` / :class:`ConvTranspose2d`, or
    :class:`MaxPool2d` with ``_POOL_SWAPS``): same parameters and state, a class change,
    nothing copied."""
    for module in model.modules():  # (the model itself included)
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]
    return model


_DROPOUTS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
             torch.nn.FeatureAlphaDropout)


def _is_identity(node, modules):
    """Whether ``node`` returns its first argument unchanged in the traced (eval) model:
    ``Identity``, a dropout module in eval mode, or a call traced with ``training=False``
    (``F.dropout``, torchvision's ``stochastic_depth``: EfficientNet's residual branches)."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return type(m) is torch.nn.Identity or (isinstance(m, _DROPOUTS) and not m.training)
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    target = node.target
    if target is torch.nn.functional.dropout:
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
    elif (getattr(target, "__name__", None) == "stochastic_depth"
          and getattr(target, "__module__", None) == "torchvision.ops.stochastic_depth"):
        training = node.args[3] if len(node.args) > 3 else node.kwargs.get("training", True)
    else:
        return False
    return training is False


def _drop_identities(gm):
    """Nodes that pass their input through unchanged in eval mode (see :func:`_is_identity`)
    are removed, so a residual add after one fuses into the convolution before it (torch.fx
    records ``stochastic_depth(x, p, mode, training=False)`` between EfficientNet's projection
    and its ``+=``: 9 unfused adds and twice as many chains).  The converted model is for
    inference: in train mode those layers would no longer drop anything (its BatchNorms are
    folded already)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if _is_identity(node, modules):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


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


def _chain(gm):
    """Every run of two or more consecutive :class:`FusedConv2d` calls in ``gm``'s graph becomes
    one :class:`ConvChain` call (its outputs that later nodes use through ``getitem`` where
    there are several)."""
    modules = dict(gm.named_modules())

    def chainable(node):
        return (node.op == "call_module" and type(modules.get(node.target)) is FusedConv2d and not node.kwargs
                and all(isinstance(a, torch.fx.Node) for a in node.args))

    runs, run = [], []
    for node in gm.graph.nodes:
        if chainable(node):
            run.append(node)
            continue
        if len(run) > 1:
            runs.append(run)
        run = []
    for count, run in enumerate(runs):
        index = {node: k for k, node in enumerate(run)}
        inputs, wiring = [], []

        def source(a):
            if a in index:
                return index[a]
            if a not in inputs:
                inputs.append(a)
            return -1 - inputs.index(a)
        for node in run:
            wiring.append((source(node.args[0]), source(node.args[1]) if len(node.args) > 1 else None))
        outputs = [k for k, node in enumerate(run) if any(u not in index for u in node.users)]
        name = f"numbaconv_chain_{count}"
        gm.add_submodule(name, ConvChain([modules[node.target] for node in run], wiring, outputs))
        with gm.graph.inserting_before(run[0]):
            call = gm.graph.call_module(name, tuple(inputs))
            results = ([call] if len(outputs) == 1
                       else [gm.graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))])
        for k, result in zip(outputs, results):
            run[k].replace_all_uses_with(result, delete_user_cb=lambda user: user not in index)
        for node in reversed(run):
            gm.graph.erase_node(node)
