"""The front door: validate -> plan -> dispatch.

1. :meth:`ConvProblem.from_args` parses and validates every argument (the only place
   that raises the contract's errors; ``from_args_cached`` remembers accepted ones);
2. the plan: make ``x`` C-contiguous in its layout (a copy only for views with other
   strides), materialise non-zero padding modes, pick the algorithm, bring the weights
   to the layout it asks for (no copy when they already are);
3. the algorithm's ``run`` fills ``out``.
"""

import numpy as np

from . import auto
from .layout import to_layout
from .padding import pad_input
from .problem import ConvProblem, is_device_array
from .registry import REGISTRY, algorithms, usable

__all__ = ["conv2d"]


def _check_algorithm(algorithm):
    # only the named algorithm's availability: ``algorithms()`` probes every backend (the
    # cuda probe costs ~40 us, a third of a small depthwise layer)
    if algorithm != "auto" and not usable(algorithm):
        raise ValueError(f"algorithm must be 'auto' or one of {algorithms()}, got {algorithm!r}")


def conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
           padding_mode="zeros", layout="NCHW", weight_layout=None,
           algorithm="auto", out=None):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d`` (see SPEC.md for every form).

    ``x`` is ``(N, C, H, W)`` for ``layout="NCHW"`` or ``(N, H, W, C)`` for ``"NHWC"``;
    ``weight`` is in ``weight_layout`` (default ``"OIHW"`` for NCHW, ``"HWIO"`` for NHWC).
    Returns a new C-contiguous array in ``layout`` (or ``out``, filled).
    """
    _check_algorithm(algorithm)
    if algorithm == "auto" and is_device_array(x):
        if "cuda" not in algorithms():
            raise ValueError(f"x is a device array ({type(x).__name__}) but the 'cuda' algorithm is not "
                             "available here (install numbaconv[cuda] on a machine with a GPU)")
        algorithm = "cuda"
    if algorithm == "cuda":
        return REGISTRY["cuda"].run(x, weight, bias, stride=stride, padding=padding, dilation=dilation,
                                    groups=groups, padding_mode=padding_mode, layout=layout,
                                    weight_layout=weight_layout, out=out)
    problem = ConvProblem.from_args_cached(x, weight, bias, stride=stride, padding=padding, dilation=dilation,
                                           groups=groups, padding_mode=padding_mode, layout=layout,
                                           weight_layout=weight_layout)
    problem.check_out(out, ("x", x), ("weight", weight), ("bias", bias))
    if out is None:
        out = np.empty(problem.out_shape, dtype=problem.dtype)
    if out.size == 0:
        return out

    x = np.ascontiguousarray(x)
    if problem.padding_mode != "zeros" and problem.has_padding:
        x = pad_input(x, problem)
        problem = problem.materialised()
    if bias is not None:
        bias = np.ascontiguousarray(bias)
    if algorithm == "auto":
        algorithm = auto.choose(problem)
        if auto.benchmark:
            algorithm = auto.choose_measured(problem, lambda name: _run(name, problem, x, weight, bias, out))
    _run(algorithm, problem, x, weight, bias, out)
    return out


def _run(name, problem, x, weight, bias, out):
    """Algorithm ``name`` on the planned arrays: weights brought to the layout it takes."""
    algo = REGISTRY[name]
    w = to_layout(weight, problem.weight_layout, algo.weight_layout(problem.layout))
    algo.run(problem, x, w, bias, out)
