"""``Conv2dPlan``: one layer's arguments validated and its weights prepared once, for inference
loops that run the layer many times.

What a plan saves per call, next to ``conv2d``: parsing the arguments (a memo per input
shape), converting the weights' layout, and the weight caches' bit-for-bit check of the
caller's weights (which reads them twice: 0.2-0.4 ms for ResNet's 9.4 MB res5 weights).
The plan holds a private copy of the weights in the layout the kernels take, marked as
owned (:func:`numbaconv.cpu._wcache.own`): packed or Winograd-transformed forms are made on
the first call that needs each form and kept with the plan.
"""

import threading
from dataclasses import replace

import numpy as np

from .api import batched_residual, bind, convolve
from .cpu._wcache import own
from .cpu.epilogue import Epilogue
from .layout import ACTIVATION_LAYOUTS, DEFAULT_WEIGHT_LAYOUT, WEIGHT_LAYOUTS, to_layout
from .problem import ConvProblem, call_unbatched, check_activation, check_array, check_residual, unbatched
from .registry import algorithms, usable

__all__ = ["Conv2dPlan"]

#: the spatial size of the stand-in input that validates a plan's arguments at construction
_PROBE = 1 << 20


#: ``ndarray.flags.num`` bits (NumPy's NPY_ARRAY_C_CONTIGUOUS, | NPY_ARRAY_WRITEABLE): one
#: integer test instead of a flags object per property on every call
_C_CONTIGUOUS = 0x1
_WRITEABLE_C = 0x1 | 0x400


class Conv2dPlan:
    """``plan(x, *, residual=None, out=None)`` equals ``conv2d(x, weight, bias, <arguments>,
    residual=residual, out=out)`` for any batch and image size (see SPEC.md).

    The weights and bias are copied at construction; later changes to the caller's arrays do
    not reach the plan.  Safe to call from several Python threads at once.
    """

    def __init__(self, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros",
                 layout="NCHW", weight_layout=None, algorithm="auto", activation=None):
        check_array("weight", weight)
        if layout not in ACTIVATION_LAYOUTS:
            raise ValueError(f"layout must be one of {ACTIVATION_LAYOUTS}, got {layout!r}")
        check_activation(activation)
        if algorithm != "auto" and not usable(algorithm):
            raise ValueError(f"algorithm must be 'auto' or one of {algorithms()}, got {algorithm!r}")
        self._args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                          padding_mode=padding_mode, layout=layout, weight_layout=weight_layout)
        self.algorithm = algorithm
        self.activation = activation
        self.layout = layout
        self.dtype = weight.dtype
        # everything that does not depend on x, validated now on a stand-in input (no memory:
        # an empty batch), with conv2d's messages
        wl = weight_layout or DEFAULT_WEIGHT_LAYOUT[layout]
        cg = weight.shape[wl.index("I")] if weight.ndim == 4 and wl in WEIGHT_LAYOUTS else 1
        c = cg * groups if isinstance(groups, int) and groups >= 1 else cg
        probe = np.empty((0, c, _PROBE, _PROBE) if layout == "NCHW" else (0, _PROBE, _PROBE, c), dtype=weight.dtype)
        problem = ConvProblem.from_args(probe, weight, bias, **self._args)
        self._user_weight_shape = weight.shape
        # the private copies, in the layout every host kernel takes for this activation layout
        self._kernel_layout = DEFAULT_WEIGHT_LAYOUT[layout]
        self._weight = np.array(to_layout(weight, problem.weight_layout, self._kernel_layout), order="C", copy=True)
        self._bias = None if bias is None else np.array(bias, order="C", copy=True)
        own(self._weight)
        # zero padding multiplies finite weights into zeros: the NaN fix-up can never apply
        self._finite = bool(np.isfinite(self._weight).all())
        # (kernels get the epilogue argument even without an activation: a model's plans then
        # share one compiled signature per kernel; see Epilogue.always)
        self._epi = Epilogue.of(activation)._replace(always=True)
        self._entries = {}
        self._lock = threading.Lock()

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._args.items() if v is not None)
        return (f"Conv2dPlan(weight{self._user_weight_shape}, bias={'yes' if self._bias is not None else None}, "
                f"{args}, algorithm={self.algorithm!r}, activation={self.activation!r})")

    def _entry(self, x):
        """``(problem, launch)`` for ``x`` (memo per input type, dtype and shape); ``launch`` is
        :func:`numbaconv.api.bind`'s, or None where every call takes the front door's path."""
        key = (type(x), getattr(x, "dtype", None), getattr(x, "shape", None))
        try:
            entry = self._entries.get(key)
        except TypeError:  # an unhashable shape attribute: not an array
            entry = None
        if entry is None:
            # validate against the caller's weight shape and layout, so errors read as conv2d's
            stand_in = np.lib.stride_tricks.as_strided(np.zeros(1, self.dtype), self._user_weight_shape,
                                                       (0,) * len(self._user_weight_shape))
            problem = ConvProblem.from_args(x, stand_in, self._bias, **self._args)
            problem = replace(problem, weight_layout=self._kernel_layout)
            launch = None
            if self._finite and problem.n > 0 and self.algorithm != "cuda":
                launch = bind(problem, self._weight, self._bias, self.algorithm)
            entry = (problem, launch)
            with self._lock:
                if len(self._entries) >= 64:
                    self._entries.clear()
                self._entries[key] = entry
        return entry

    def _launcher(self, x):
        """``(run, out_shape, dtype)``: ``run(x, out, residual)`` computes ``plan(x, out=out,
        residual=residual)`` for a C-contiguous NumPy ``x`` of ``x``'s dtype and shape into a
        C-contiguous ``out`` of that shape and dtype, ``residual`` None or C-contiguous like
        ``out``, neither overlapping another, with no check; or None where calls take the
        checked path.  For callers that check those conditions themselves, once per call
        (numbaconv.torch's layers)."""
        if type(x) is not np.ndarray or unbatched(x) or not x.flags.c_contiguous:
            return None
        problem, launch = self._entry(x)
        if launch is None:
            return None
        epi, act = self._epi, self._epi.act

        def run(x, out, residual):
            launch(x, out, epi if residual is None else Epilogue(act, residual))
        return run, problem.out_shape, problem.dtype

    def out_shape(self, x):
        """The shape of ``plan(x)`` (``x`` validated as a call would)."""
        if unbatched(x):
            return self.out_shape(x[None])[1:]
        return self._entry(x)[0].out_shape

    def __call__(self, x, *, residual=None, out=None):
        entry = self._entries.get((type(x), x.dtype, x.shape)) if type(x) is np.ndarray else None
        if entry is not None and entry[1] is not None and residual is None and x.flags.num & _C_CONTIGUOUS:
            # the common inference call: the key above holds x's checks
            problem, launch = entry
            if out is None:
                out = np.empty(problem.out_shape, dtype=problem.dtype)
            elif not (type(out) is np.ndarray and out.dtype == problem.dtype and out.shape == problem.out_shape
                      and out.flags.num & _WRITEABLE_C == _WRITEABLE_C and not np.may_share_memory(out, x)):
                problem.check_out(out, ("x", x))  # raises the contract's error
            launch(x, out, self._epi)
            return out
        if unbatched(x):
            return call_unbatched(self.__call__, x, out, residual=batched_residual(residual, x))
        if self.algorithm == "cuda" or not isinstance(x, np.ndarray):
            from .api import conv2d  # device arrays: conv2d's own path (no prepared weights on the GPU yet)
            return conv2d(x, self._weight, self._bias, **{**self._args, "weight_layout": self._kernel_layout},
                          algorithm=self.algorithm, activation=self.activation, residual=residual, out=out)
        problem, launch = self._entry(x)
        if out is not None:
            problem.check_out(out, ("x", x))
        in_place = residual is not None and check_residual(problem, residual, out)
        if launch is None:
            return convolve(problem, x, self._weight, self._bias, self.algorithm, out,
                            with_padding_products=not self._finite, activation=self.activation,
                            residual=residual, in_place=in_place)
        if out is None:
            out = np.empty(problem.out_shape, dtype=problem.dtype)
        epi = self._epi if residual is None else Epilogue.of(self.activation, residual, in_place)
        launch(np.ascontiguousarray(x), out, epi)
        return out
