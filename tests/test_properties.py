"""Property-based suite: random geometry and argument forms against torch in float64.

Every case draws a geometry (batch 0-3, channels 1-24 with every valid group count,
depthwise included, sizes 1-40, non-square kernels 1-7, stride 1-4, dilation 1-3, every
padding form -- "same" with any stride included -- and every padding mode, bias or not),
an algorithm, both layouts, every weight layout, float32 / float64, inputs as C-contiguous,
Fortran-ordered, negative-stride or strided views, sometimes ``out=`` and sometimes NaN /
Inf values, and checks:

* where torch computes a result, numbaconv's equals it within the contract's bound
  ``|y - y_exact| <= tol * conv(|x|, |w|)`` elementwise (tol 1e-4 for float32, 1e-11 for
  float64), and its NaN / +Inf / -Inf positions are exactly torch's;
* where torch refuses the arguments, numbaconv raises ``ValueError``;
* inputs are unchanged (bit for bit) and the result is C-contiguous (``out`` itself when given).

Seeds are fixed (``derandomize=True``), so CI is deterministic.  ``NUMBACONV_PROPERTY_SCALE``
multiplies every test's example budget for a long run (README: "Property-based tests").
Extreme geometry (padding, dilation or stride far beyond the image, 1-pixel images, empty
axes) runs in ``tests/extreme_geometry.py``, in a subprocess with ``NUMBA_BOUNDSCHECK=1``.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import numbaconv
import reference as ref
from numbaconv.registry import REGISTRY

SCALE = float(os.environ.get("NUMBACONV_PROPERTY_SCALE", "1") or 1)
HOST_ALGORITHMS = [name for name in numbaconv.algorithms() if REGISTRY[name].host] + ["auto"]
MODES = ["zeros", "reflect", "replicate", "circular"]
WEIGHT_LAYOUTS = ["OIHW", "HWIO", "OHWI"]
TOL = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-11}


def budget(n):
    return settings(max_examples=max(1, int(n * SCALE)), derandomize=True, deadline=None, database=None,
                    print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# --- strategies ------------------------------------------------------------------------------
@st.composite
def channels(draw, max_c=24):
    """``(C, K, groups)``: dense, grouped (every divisor of C) or depthwise (multiplier 1-2)."""
    kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
    if kind == "depthwise":
        c = draw(st.integers(1, max_c))
        return c, c * draw(st.integers(1, 2)), c
    if kind == "grouped":
        c = draw(st.integers(2, max_c))
        groups = draw(st.sampled_from([g for g in range(2, c + 1) if c % g == 0]))
        return c, groups * draw(st.integers(1, max(1, max_c // groups))), groups
    return draw(st.integers(1, max_c)), draw(st.integers(1, max_c)), 1


@st.composite
def padding_forms(draw, max_pad=4, strings=True):
    kinds = ["int", "pair", "pairs"] + (["valid", "same", "same"] if strings else [])
    kind = draw(st.sampled_from(kinds))
    small = st.integers(0, max_pad)
    if kind == "int":
        return draw(small)
    if kind == "pair":
        return (draw(small), draw(small))
    if kind == "pairs":
        return ((draw(small), draw(small)), (draw(small), draw(small)))
    return kind


pairs = lambda lo, hi: st.tuples(st.integers(lo, hi), st.integers(lo, hi))  # noqa: E731


@st.composite
def geometry(draw):
    c, k, groups = draw(channels())
    return dict(n=draw(st.integers(0, 3)), c=c, k=k, groups=groups,
                hw=draw(pairs(1, 40)), rs=draw(pairs(1, 7)),
                stride=draw(pairs(1, 4)), dilation=draw(pairs(1, 3)),
                padding=draw(padding_forms()), padding_mode=draw(st.sampled_from(MODES)))


@st.composite
def values(draw, shape, dtype, nonfinite=False):
    """Random values over a wide dynamic range (per-element magnitudes 1e-3..1e3 in some
    cases), optionally with a few NaN / +Inf / -Inf entries."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.standard_normal(shape)
    if draw(st.booleans()):
        a *= 10.0 ** rng.uniform(-3, 3, size=shape)
    a = a.astype(dtype)
    if nonfinite and a.size:
        for _ in range(draw(st.integers(1, 3))):
            a.flat[rng.integers(a.size)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return a


VIEWS = ["c", "fortran", "flipped", "strided"]


def as_view(a, kind):
    """An array equal to ``a`` with other strides: Fortran order, negative strides, or a
    strided view into a larger buffer."""
    if kind == "fortran":
        return np.asfortranarray(a)
    if kind == "flipped":
        axis = int(np.argmax(a.shape)) if a.ndim else 0
        return np.flip(np.flip(a, axis).copy(), axis)
    if kind == "strided":
        big = np.full(tuple(2 * d for d in a.shape), np.nan, dtype=a.dtype)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    return np.ascontiguousarray(a).copy()


# --- checks ----------------------------------------------------------------------------------
def _torch(fn):
    """``(result, None)`` or ``(None, error)``: torch (float64) as the oracle of validity too."""
    try:
        return fn(), None
    except (RuntimeError, ValueError) as exc:
        return None, exc


def finite_abs(a):
    """``|a|`` with non-finite entries as 0 (for the error bound; see :func:`assert_matches`)."""
    if a is None:
        return None
    b = np.abs(np.asarray(a, dtype=np.float64))
    b[~np.isfinite(b)] = 0
    return b


def assert_matches(got, expected, bound, dtype, what="result"):
    """``got`` equals torch's ``expected`` within ``TOL * bound``; NaN / +-Inf exactly where torch has them.

    Where torch's value is finite no non-finite input can reach it (``inf * w`` is +-inf
    or NaN), so the bound is computed from the finite inputs only."""
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    for name, pred in (("NaN", np.isnan), ("+Inf", np.isposinf), ("-Inf", np.isneginf)):
        g, e = pred(got), pred(expected)
        if not np.array_equal(g, e):
            idx = np.argwhere(g != e)[:5]
            raise AssertionError(f"{what}: {name} positions differ from torch at {idx.tolist()} "
                                 f"(got {got[tuple(idx[0])]}, torch {expected[tuple(idx[0])]})")
    fin = np.isfinite(expected)
    err = np.abs(got[fin].astype(np.float64) - expected[fin])
    limit = TOL[np.dtype(dtype)] * bound[fin] + np.finfo(dtype).tiny
    if err.size and not (err <= limit).all():
        worst = int(np.argmax(err - limit))
        raise AssertionError(f"{what}: error {err[worst]:.3g} exceeds the bound {limit[worst]:.3g} "
                             f"({int((err > limit).sum())} of {err.size} values)")


def snapshot(*arrays):
    return [None if a is None else (a, np.array(a, copy=True)) for a in arrays]


def assert_unchanged(snap):
    for item in snap:
        if item is not None:
            a, before = item
            assert np.array_equal(a, before, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(before)), \
                "an input was modified"


# --- conv2d ------------------------------------------------------------------------------------
@budget(1500)
@given(g=geometry(), algo=st.sampled_from(HOST_ALGORITHMS), layout=st.sampled_from(["NCHW", "NHWC"]),
       weight_layout=st.sampled_from(WEIGHT_LAYOUTS), dtype=st.sampled_from([np.float32, np.float64]),
       bias=st.booleans(), x_view=st.sampled_from(VIEWS), w_view=st.sampled_from(VIEWS),
       use_out=st.booleans(), nonfinite=st.sampled_from([None] * 6 + ["x", "weight", "bias"]),
       unbatched=st.booleans(), data=st.data())
def test_conv2d_matches_torch(g, algo, layout, weight_layout, dtype, bias, x_view, w_view, use_out, nonfinite,
                              unbatched, data):
    (h, w), (r, s) = g["hw"], g["rs"]
    x = data.draw(values((g["n"], g["c"], h, w), dtype, nonfinite == "x"), "x")
    wt = data.draw(values((g["k"], g["c"] // g["groups"], r, s), dtype, nonfinite == "weight"), "w")
    b = data.draw(values((g["k"],), dtype, nonfinite == "bias"), "b") if bias or nonfinite == "bias" else None
    kwargs = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"],
                  padding_mode=g["padding_mode"])
    expected, error = _torch(lambda: ref.torch_conv2d(x, wt, b, **kwargs))
    xv = as_view(ref.to_act(x, layout), x_view)
    wv = as_view(ref.to_weight(wt, weight_layout), w_view)
    unbatched = unbatched and g["n"] == 1  # one image without its batch axis, as torch takes it
    first = (lambda a: a[0]) if unbatched else (lambda a: a)  # noqa: E731
    xv = first(xv)
    note(f"x {xv.shape} {xv.strides}, w {wv.shape} {wv.strides}")
    call = dict(layout=layout, weight_layout=weight_layout, algorithm=algo, **kwargs)
    if error is not None:
        note(f"torch refuses: {error}")
        with pytest.raises(ValueError):
            numbaconv.conv2d(xv, wv, b, **call)
        return
    out = None
    if use_out:
        out = np.full(first(ref.to_act(expected, layout)).shape, np.nan, dtype=dtype)
    snap = snapshot(xv, wv, b)
    got = numbaconv.conv2d(xv, wv, b, out=out, **call)
    assert_unchanged(snap)
    assert got.flags.c_contiguous and got.dtype == dtype
    if use_out:
        assert got is out
    bound = ref.torch_conv2d(finite_abs(x), finite_abs(wt), finite_abs(b), **kwargs)
    assert_matches(got, first(ref.to_act(expected, layout)), first(ref.to_act(bound, layout)), dtype)


# --- conv_transpose2d ----------------------------------------------------------------------------
@budget(400)
@given(chan=channels(), n=st.integers(0, 3), hw=pairs(1, 20), rs=pairs(1, 7), stride=pairs(1, 4),
       dilation=pairs(1, 3), padding=padding_forms(max_pad=4, strings=False), output_padding=pairs(0, 3),
       layout=st.sampled_from(["NCHW", "NHWC"]), weight_layout=st.sampled_from(WEIGHT_LAYOUTS),
       dtype=st.sampled_from([np.float32, np.float64]), bias=st.booleans(), x_view=st.sampled_from(VIEWS),
       nonfinite=st.sampled_from([None] * 6 + ["x", "weight"]), unbatched=st.booleans(), data=st.data())
def test_conv_transpose2d_matches_torch(chan, n, hw, rs, stride, dilation, padding, output_padding, layout,
                                        weight_layout, dtype, bias, x_view, nonfinite, unbatched, data):
    if isinstance(padding, tuple) and isinstance(padding[0], tuple):
        padding = (padding[0][0], padding[1][0])  # conv_transpose2d takes symmetric padding only
    c_out, c_in, groups = chan  # the transposed convolution maps c_in -> c_out channels
    x = data.draw(values((n, c_in) + hw, dtype, nonfinite == "x"), "x")
    wt = data.draw(values((c_in, c_out // groups) + rs, dtype, nonfinite == "weight"), "w")
    b = data.draw(values((c_out,), dtype), "b") if bias else None
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups, dilation=dilation)

    def torch_transpose(x_, w_, b_):
        t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.float64))  # noqa: E731
        if x_.shape[0] == 0:  # torch skips validation for an empty batch: judge it with one image
            one = np.zeros((1,) + x_.shape[1:])
            return F.conv_transpose2d(t(one), t(w_), t(b_), **kwargs).numpy()[:0]
        return F.conv_transpose2d(t(x_), t(w_), t(b_), **kwargs).numpy()

    expected, error = _torch(lambda: torch_transpose(x, wt, b))
    unbatched = unbatched and n == 1  # one image without its batch axis, as torch takes it
    first = (lambda a: a[0]) if unbatched else (lambda a: a)  # noqa: E731
    xv = first(as_view(ref.to_act(x, layout), x_view))
    wv = ref.to_weight(wt, weight_layout)
    call = dict(layout=layout, weight_layout=weight_layout, **kwargs)
    if error is not None:
        note(f"torch refuses: {error}")
        with pytest.raises(ValueError):
            numbaconv.conv_transpose2d(xv, wv, b, **call)
        return
    snap = snapshot(xv, wv, b)
    got = numbaconv.conv_transpose2d(xv, wv, b, **call)
    assert_unchanged(snap)
    assert got.flags.c_contiguous and got.dtype == dtype
    bound = torch_transpose(finite_abs(x), finite_abs(wt), finite_abs(b))
    assert_matches(got, first(ref.to_act(expected, layout)), first(ref.to_act(bound, layout)), dtype)


# --- backward ------------------------------------------------------------------------------------
@budget(400)
@given(g=geometry(), layout=st.sampled_from(["NCHW", "NHWC"]), weight_layout=st.sampled_from(WEIGHT_LAYOUTS),
       dtype=st.sampled_from([np.float32, np.float64]), x_view=st.sampled_from(VIEWS),
       gy_view=st.sampled_from(VIEWS), nonfinite=st.sampled_from([None] * 6 + ["x", "weight", "grad"]),
       data=st.data())
def test_conv2d_backward_matches_torch(g, layout, weight_layout, dtype, x_view, gy_view, nonfinite, data):
    (h, w), (r, s) = g["hw"], g["rs"]
    x = data.draw(values((g["n"], g["c"], h, w), dtype, nonfinite == "x"), "x")
    wt = data.draw(values((g["k"], g["c"] // g["groups"], r, s), dtype, nonfinite == "weight"), "w")
    kwargs = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"],
                  padding_mode=g["padding_mode"])
    y, error = _torch(lambda: ref.torch_conv2d(x, wt, None, **kwargs))
    if error is not None or y.shape[0] == 0:
        return  # validation is conv2d's (tested above); torch's backward needs a batch
    gy = data.draw(values(y.shape, dtype, nonfinite == "grad"), "gy")
    zero_bias = np.zeros(g["k"])
    dx, dw, db = ref.torch_grads(x, wt, zero_bias, gy, **kwargs)
    bx, bw, bb = ref.torch_grads(finite_abs(x), finite_abs(wt), zero_bias, finite_abs(gy), **kwargs)
    xv = as_view(ref.to_act(x, layout), x_view)
    gv = as_view(ref.to_act(gy, layout), gy_view)
    wv = ref.to_weight(wt, weight_layout)
    snap = snapshot(xv, gv, wv)
    gx, gw, gb = numbaconv.conv2d_backward(gv, xv, wv, layout=layout, weight_layout=weight_layout, **kwargs)
    assert_unchanged(snap)
    for a in (gx, gw, gb):
        assert a.flags.c_contiguous and a.dtype == dtype
    assert_matches(gx, ref.to_act(dx, layout), ref.to_act(bx, layout), dtype, "grad_input")
    assert_matches(gw, ref.to_weight(dw, weight_layout), ref.to_weight(bw, weight_layout), dtype, "grad_weight")
    assert_matches(gb, db, bb, dtype, "grad_bias")


# --- im2col / col2im -----------------------------------------------------------------------------
@budget(300)
@given(n=st.integers(0, 3), c=st.integers(1, 8), hw=pairs(1, 24), rs=pairs(1, 7), stride=pairs(1, 4),
       dilation=pairs(1, 3), padding=pairs(0, 6), dtype=st.sampled_from([np.float32, np.float64]),
       view=st.sampled_from(VIEWS), data=st.data())
def test_im2col_col2im_match_torch(n, c, hw, rs, stride, dilation, padding, dtype, view, data):
    x = data.draw(values((n, c) + hw, dtype), "x")
    kwargs = dict(stride=stride, padding=padding, dilation=dilation)
    t = lambda a: torch.from_numpy(np.array(a, np.float64))  # noqa: E731 -- a copy: torch takes no negative strides
    expected, error = _torch(lambda: F.unfold(t(x), rs, **kwargs).numpy())
    xv = as_view(x, view)
    if error is not None:
        with pytest.raises(ValueError):
            numbaconv.im2col(xv, rs, **kwargs)
        with pytest.raises(ValueError):
            numbaconv.col2im(np.zeros((n, c * rs[0] * rs[1], 1), dtype), hw, rs, **kwargs)
        return
    snap = snapshot(xv)
    cols = numbaconv.im2col(xv, rs, **kwargs)
    assert_unchanged(snap)
    assert cols.flags.c_contiguous and cols.dtype == dtype
    np.testing.assert_array_equal(cols, expected)  # a copy: exact
    cv = as_view(data.draw(values(cols.shape, dtype), "cols"), view)
    folded = F.fold(t(cv), hw, rs, **kwargs).numpy()
    bound = F.fold(t(np.abs(cv)), hw, rs, **kwargs).numpy()
    got = numbaconv.col2im(cv, hw, rs, **kwargs)
    assert got.flags.c_contiguous and got.dtype == dtype
    assert_matches(got, folded, bound, dtype, "col2im")


# --- max pooling of converted models ------------------------------------------------------------
@budget(300)
@given(n=st.integers(0, 3), c=st.integers(1, 8), hw=pairs(1, 24), k=pairs(1, 5), stride=pairs(1, 4),
       dilation=pairs(1, 3), ceil_mode=st.booleans(), channels_last=st.booleans(),
       dtype=st.sampled_from([np.float32, np.float64]), nonfinite=st.booleans(), data=st.data())
def test_converted_max_pool_matches_torch(n, c, hw, k, stride, dilation, ceil_mode, channels_last, dtype,
                                          nonfinite, data):
    """``numbaconv.torch.MaxPool2d`` (what ``convert`` gives eval models) equals torch's
    ``max_pool2d`` exactly, NaN and infinities included, or raises torch's error (padding
    up to half the kernel, as torch allows, and now and then more)."""
    import numbaconv.torch as nt
    over = data.draw(st.sampled_from([False, False, False, True]))  # (now and then more than torch allows)
    pad = tuple(data.draw(st.integers(0, 3 if over else q // 2)) for q in k)
    x = torch.from_numpy(data.draw(values((n, c, *hw), dtype, nonfinite)))
    if nonfinite and x.numel():  # (a NaN or Inf in a fifth of the windows, not one in the image)
        mask = torch.from_numpy(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))).random(x.shape) < 0.05)
        x[mask] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    before = x.clone()
    kw = dict(kernel_size=k, stride=stride, padding=pad, dilation=dilation, ceil_mode=ceil_mode)
    expected, error = _torch(lambda: F.max_pool2d(x, **kw))
    note(f"x {tuple(x.shape)} {kw} torch: {error!r}")
    with torch.no_grad():
        if error is not None:
            with pytest.raises(type(error)):
                nt.MaxPool2d(**kw)(x)
            return
        got = nt.MaxPool2d(**kw)(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    fin = ~torch.isnan(expected)
    assert torch.equal(got[fin], expected[fin])
    assert torch.equal(torch.isnan(x), torch.isnan(before)) and torch.equal(x[~torch.isnan(x)], before[~torch.isnan(before)])


# --- extreme geometry, bounds-checked ----------------------------------------------------------------
def test_extreme_geometry_under_boundscheck():
    """``tests/extreme_geometry.py`` in a subprocess with ``NUMBA_BOUNDSCHECK=1``: an
    out-of-bounds access raises there (an IndexError, a failed test) instead of corrupting
    this process, and a crash fails this test.  Bounds-checked kernels compile into a cache
    directory of their own (Numba's cache key does not include the flag)."""
    here = pathlib.Path(__file__).parent
    cache = os.environ.get("NUMBA_CACHE_DIR") or str(here.parent / ".numba-cache")
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=os.path.join(cache, "boundscheck"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(here / "extreme_geometry.py")], cwd=here.parent, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
