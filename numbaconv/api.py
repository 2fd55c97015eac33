"""The front door: validate -> plan -> dispatch.

1. :meth:`ConvProblem.from_args` parses and validates every argument (the only place
   that raises the contract's errors; ``from_args_cached`` remembers accepted ones);
2. the plan: make ``x`` C-contiguous in its layout (a copy only for views with other
   strides), materialise non-zero padding modes, pick the algorithm, bring the weights
   to the layout it asks for (no copy when they already are);
3. the algorithm's ``run`` fills ``out``, with the epilogue (``activation``, ``residual``)
   fused into its stores where the module says it can (``FUSES_EPILOGUE``), else applied
   after it in one parallel pass (:mod:`numbaconv.cpu.epilogue`).
"""

import numpy as np

from . import auto
from .layout import to_layout
from .cpu import _wcache, epilogue
from .padding import gather_compacted, pad_input, padding_products
from .problem import ConvProblem, call_unbatched, check_activation, check_residual, is_device_array, unbatched
from .registry import REGISTRY, algorithms, usable

__all__ = ["bind", "conv2d", "convolve"]


def _check_algorithm(algorithm):
    # only the named algorithm's availability: ``algorithms()`` probes every backend (the
    # cuda probe costs ~40 us, a third of a small depthwise layer)
    if algorithm != "auto" and not usable(algorithm):
        raise ValueError(f"algorithm must be 'auto' or one of {algorithms()}, got {algorithm!r}")


def conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
           padding_mode="zeros", layout="NCHW", weight_layout=None,
           algorithm="auto", activation=None, residual=None, out=None):
    """2-D cross-correlation, as ``torch.nn.functional.conv2d`` (see SPEC.md for every form).

    ``x`` is ``(N, C, H, W)`` for ``layout="NCHW"`` or ``(N, H, W, C)`` for ``"NHWC"``, or one
    unbatched image ``(C, H, W)`` / ``(H, W, C)`` (the result is 3-D too, as in torch);
    ``weight`` is in ``weight_layout`` (default ``"OIHW"`` for NCHW, ``"HWIO"`` for NHWC).
    ``activation`` (``"relu"``, ``"relu6"``, ``"silu"``, ``"hardswish"``) and ``residual`` (an
    array of the result's shape, added before the activation; ``out`` may be the residual
    itself) give ``activation(conv + bias + residual)``.
    Returns a new C-contiguous array in ``layout`` (or ``out``, filled).
    """
    if unbatched(x):
        return call_unbatched(conv2d, x, out, weight, bias, stride=stride, padding=padding, dilation=dilation,
                              groups=groups, padding_mode=padding_mode, layout=layout, weight_layout=weight_layout,
                              algorithm=algorithm, activation=activation, residual=batched_residual(residual, x))
    check_activation(activation)
    _check_algorithm(algorithm)
    if algorithm == "auto" and is_device_array(x):
        if "cuda" not in algorithms():
            raise ValueError(f"x is a device array ({type(x).__name__}) but the 'cuda' algorithm is not "
                             "available here (install numbaconv[cuda] on a machine with a GPU)")
        algorithm = "cuda"
    if algorithm == "cuda":
        return REGISTRY["cuda"].run(x, weight, bias, stride=stride, padding=padding, dilation=dilation,
                                    groups=groups, padding_mode=padding_mode, layout=layout,
                                    weight_layout=weight_layout, activation=activation, residual=residual,
                                    out=out)
    problem = ConvProblem.from_args_cached(x, weight, bias, stride=stride, padding=padding, dilation=dilation,
                                           groups=groups, padding_mode=padding_mode, layout=layout,
                                           weight_layout=weight_layout)
    inputs = (("x", x), ("weight", weight), ("bias", bias))
    problem.check_out(out, *inputs)
    in_place = check_residual(problem, residual, out)
    return convolve(problem, x, weight, bias, algorithm, out, activation=activation, residual=residual,
                    in_place=in_place)


def batched_residual(residual, x):
    """An unbatched call's residual (3-D, as its ``x``) as a batch of one."""
    if isinstance(residual, np.ndarray):
        if residual.ndim != 3:
            raise ValueError(f"residual must be 3-D for a 3-D (unbatched) x of shape {x.shape}, got shape "
                             f"{residual.shape}")
        return residual[None]
    return residual


def convolve(problem, x, weight, bias, algorithm="auto", out=None, with_padding_products=True, activation=None,
             residual=None, in_place=False):
    """The convolution ``problem`` describes, on validated arguments (steps 2-4 above).

    ``with_padding_products``: give torch's NaN where zero padding meets a non-finite weight
    (``conv2d``'s contract); the backward's grad-input convolutions, whose padding stands
    for outputs that do not exist, turn it off.  ``in_place``: ``out`` is ``residual``.
    """
    if out is None:
        out = np.empty(problem.out_shape, dtype=problem.dtype)
    if out.size == 0:
        return out
    epi = epilogue.Epilogue.of(activation, residual, in_place)
    _wcache.begin_call()  # (padding_products may then skip its scan of weights verified in this call)

    x = np.ascontiguousarray(x)
    if bias is not None:
        bias = np.ascontiguousarray(bias)
    compaction = problem.compaction
    if compaction is not None:
        _run_compacted(algorithm, problem, compaction, x, weight, bias, out)
        epi.apply(out)  # the outputs that meet only padding were set aside from the kernels
    elif problem.padding_mode != "zeros" and problem.has_padding:
        xm = pad_input(x, problem)
        _dispatch(_for_materialised(algorithm, x, xm, out), problem.materialised(), xm, weight, bias, out, epi)
    else:
        _dispatch(algorithm, problem, x, weight, bias, out, epi)
    if with_padding_products:
        # NaN where zero padding met a non-finite weight: after the epilogue is the same
        # (every activation keeps NaN)
        padding_products(problem, weight, out)
    return out


def bind(problem, weight, bias, algorithm="auto"):
    """Steps 2-3 for ``problem`` decided now: a function of ``(x, out, epi)`` (``x``
    C-contiguous) that runs the chosen kernels on weights prepared once, or ``None`` where
    a call needs more than that (padding modes, compaction, ``auto.benchmark``)."""
    if (problem.compaction is not None or (problem.padding_mode != "zeros" and problem.has_padding)
            or (algorithm == "auto" and auto.benchmark)):
        return None
    name = auto.choose(problem, prepared=True) if algorithm == "auto" else algorithm
    algo = REGISTRY[name]
    w = to_layout(weight, problem.weight_layout, algo.weight_layout(problem.layout))
    bias = None if bias is None else np.ascontiguousarray(bias)
    if getattr(algo.impl, "FUSES_EPILOGUE", False) and hasattr(algo.impl, "bind"):
        return algo.impl.bind(problem, w, bias, prepared=True)
    return lambda x, out, epi: _run(name, problem, x, w, bias, out, epi)


#: how much more than the image and the result a padding mode's materialised input may hold
#: before the direct loop reads it in place (see :func:`_for_materialised`)
MATERIALISED_SLACK_BYTES = 32 << 20

#: algorithms that copy their input once more into a blocked layout (tiled's padded NHWC,
#: Winograd's tiles), and ``auto``, which picks them
_COPYING = ("auto", "tiled", "winograd")


def _for_materialised(algorithm, x, xm, out):
    """The algorithm to run on ``xm``, the input as a padding mode materialised it (the size of
    the padded image, as torch's ``F.pad``).  tiled and Winograd would copy it once more; where
    the padding dominates -- ``xm`` outgrows the image and the result together (a few pixels
    padded by thousands) -- the direct loop reads it in place instead, so memory stays within
    one padded copy and the result (tests/extreme_geometry.py's bound)."""
    if algorithm in _COPYING and xm.nbytes > x.nbytes + out.nbytes + MATERIALISED_SLACK_BYTES:
        return "naive"
    return algorithm


def _dispatch(algorithm, problem, x, weight, bias, out, epi=epilogue.NONE):
    if algorithm == "auto":
        algorithm = auto.choose(problem)
        if auto.benchmark:
            algorithm = auto.choose_measured(problem, lambda name: _run(name, problem, x, weight, bias, out, epi))
    _run(algorithm, problem, x, weight, bias, out, epi)


#: weights of another layout than the algorithm takes (torch's OIHW with NHWC activations),
#: converted once and reused while the caller's weights are bit for bit the same (the check
#: reads them and a copy: 614 KB of 5x5 weights, NHWC at 28x28, conv2d 1.13 -> 0.92 ms on Intel
#: Xeon, as with HWIO weights); the converted array is owned, so the algorithm's own weight
#: cache reuses what it prepares from it without a second check
_LAYOUTS = _wcache.WeightCache(min_bytes=64 << 10, max_bytes=64 << 20)


def _in_layout(weight, src, dst):
    """``weight`` (in ``src``) in layout ``dst``, C-contiguous: itself when no copy is needed."""
    if src == dst or weight.nbytes < _LAYOUTS.min_bytes:
        return to_layout(weight, src, dst)
    w = np.ascontiguousarray(weight)

    def build():
        converted = to_layout(w, src, dst)
        _wcache.own(converted)
        return converted
    return _LAYOUTS.get((src, dst), w, build)


def _run(name, problem, x, weight, bias, out, epi=epilogue.NONE):
    """Algorithm ``name`` on the planned arrays: weights brought to the layout it takes; the
    epilogue in its stores, or after it."""
    algo = REGISTRY[name]
    w = _in_layout(weight, problem.weight_layout, algo.weight_layout(problem.layout))
    if not epi.active:
        algo.run(problem, x, w, bias, out)
    elif getattr(algo.impl, "FUSES_EPILOGUE", False):
        algo.run(problem, x, w, bias, out, epi=epi)
    else:
        algo.run(problem, x, w, bias, out)
        epi.apply(out)


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
    if problem.padding_mode != "zeros":  # the gathered input holds materialised padding
        algorithm = _for_materialised(algorithm, x, xs, out)
    wl = c.problem.weight_layout
    taps = [slice(None)] * 4
    taps[wl.index("H")] = slice(c.rows.tap_lo, c.rows.tap_hi)
    taps[wl.index("W")] = slice(c.cols.tap_lo, c.cols.tap_hi)
    ws = np.ascontiguousarray(weight[tuple(taps)])
    target = out if whole else np.empty(c.problem.out_shape, dtype=out.dtype)
    _dispatch(algorithm, c.problem, xs, ws, bias, target)
    if not whole:
        region[...] = target if nchw else target.transpose(0, 3, 1, 2)
