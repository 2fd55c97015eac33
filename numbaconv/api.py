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
from .padding import gather_compacted, pad_input, padding_products
from .problem import ConvProblem, call_unbatched, is_device_array, unbatched
from .registry import REGISTRY, algorithms, usable

__all__ = ["conv2d", "convolve"]


def _check_algorithm(algorithm):
    # only the named algorithm's availability: ``algorithms()`` probes every backend (the
    # cuda probe costs ~40 us, a third of a small depthwise layer)
    if algorithm != "auto" and not usable(algorithm):
        raise ValueError(f"algorithm must be 'auto' or one of {algorithms()}, got {algorithm!r}")


def conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
           padding_mode="zeros", layout="NCHW", weight_layout=None,
           algorithm="auto", out=None):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d`` (see SPEC.md for every form).

    ``x`` is ``(N, C, H, W)`` for ``layout="NCHW"`` or ``(N, H, W, C)`` for ``"NHWC"``, or one
    unbatched image ``(C, H, W)`` / ``(H, W, C)`` (the result is 3-D too, as in torch);
    ``weight`` is in ``weight_layout`` (default ``"OIHW"`` for NCHW, ``"HWIO"`` for NHWC).
    Returns a new C-contiguous array in ``layout`` (or ``out``, filled).
    """
    if unbatched(x):
        return call_unbatched(conv2d, x, out, weight, bias, stride=stride, padding=padding, dilation=dilation,
                              groups=groups, padding_mode=padding_mode, layout=layout, weight_layout=weight_layout,
                              algorithm=algorithm)
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
    return convolve(problem, x, weight, bias, algorithm, out)


def convolve(problem, x, weight, bias, algorithm="auto", out=None, with_padding_products=True):
    """The convolution ``problem`` describes, on validated arguments (steps 2-3 above).

    ``with_padding_products``: give torch's NaN where zero padding meets a non-finite weight
    (``conv2d``'s contract); the backward's grad-input convolutions, whose padding stands
    for outputs that do not exist, turn it off.
    """
    if out is None:
        out = np.empty(problem.out_shape, dtype=problem.dtype)
    if out.size == 0:
        return out

    x = np.ascontiguousarray(x)
    if bias is not None:
        bias = np.ascontiguousarray(bias)
    compaction = problem.compaction
    if compaction is not None:
        _run_compacted(algorithm, problem, compaction, x, weight, bias, out)
    elif problem.padding_mode != "zeros" and problem.has_padding:
        _dispatch(algorithm, problem.materialised(), pad_input(x, problem), weight, bias, out)
    else:
        _dispatch(algorithm, problem, x, weight, bias, out)
    if with_padding_products:
        padding_products(problem, weight, out)
    return out


def _dispatch(algorithm, problem, x, weight, bias, out):
    if algorithm == "auto":
        algorithm = auto.choose(problem)
        if auto.benchmark:
            algorithm = auto.choose_measured(problem, lambda name: _run(name, problem, x, weight, bias, out))
    _run(algorithm, problem, x, weight, bias, out)


def _run(name, problem, x, weight, bias, out):
    """Algorithm ``name`` on the planned arrays: weights brought to the layout it takes."""
    algo = REGISTRY[name]
    w = to_layout(weight, problem.weight_layout, algo.weight_layout(problem.layout))
    algo.run(problem, x, w, bias, out)


def _run_compacted(algorithm, problem, c, x, weight, bias, out):
    """A wasteful geometry on its :class:`~numbaconv.problem.Compaction`: the gathered input
    (padding mode applied), the live taps' weights, the live outputs; the other outputs meet
    only zero padding and get the bias."""
    nchw = c.problem.layout == "NCHW"
    o = out if nchw else out.transpose(0, 3, 1, 2)  # NCHW view
    rows, cols = slice(c.rows.out_lo, c.rows.out_hi), slice(c.cols.out_lo, c.cols.out_hi)
    region = o[:, :, rows, cols]
    whole = region.shape == o.shape
    if not whole:
        o[...] = 0 if bias is None else bias.reshape(1, -1, 1, 1)
    if region.size == 0:
        return
    xs = gather_compacted(x, problem, c)
    wl = c.problem.weight_layout
    taps = [slice(None)] * 4
    taps[wl.index("H")] = slice(c.rows.tap_lo, c.rows.tap_hi)
    taps[wl.index("W")] = slice(c.cols.tap_lo, c.cols.tap_hi)
    ws = np.ascontiguousarray(weight[tuple(taps)])
    target = out if whole else np.empty(c.problem.out_shape, dtype=out.dtype)
    _dispatch(algorithm, c.problem, xs, ws, bias, target)
    if not whole:
        region[...] = target if nchw else target.transpose(0, 3, 1, 2)
