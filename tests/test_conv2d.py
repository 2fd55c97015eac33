"""Conformance: every host algorithm x layout x dtype x a grid of geometry edge cases,
against torch in float64 (tests/reference.py)."""

import numpy as np
import pytest

import numbaconv
from numbaconv.registry import REGISTRY
from reference import assert_close, make_problem, to_act, to_weight, torch_conv2d

HOST_ALGORITHMS = [name for name in numbaconv.algorithms() if REGISTRY[name].host]
LAYOUTS = ["NCHW", "NHWC"]
DTYPES = [np.float32, np.float64]

# (id, shape N C H W K R S, conv kwargs)
CASES = [
    ("basic", (2, 3, 8, 9, 4, 3, 3), {}),
    ("batch1_1x1_image", (1, 5, 1, 1, 3, 1, 1), {}),
    ("1x1_image_padded", (1, 2, 1, 1, 3, 3, 3), {"padding": 1}),
    ("kernel_equals_padded_input", (2, 2, 5, 4, 3, 7, 6), {"padding": 1}),
    ("kernel_equals_input", (1, 3, 4, 5, 2, 4, 5), {}),
    ("stride_larger_than_kernel", (2, 3, 11, 10, 4, 2, 2), {"stride": 3}),
    ("stride_pair", (1, 2, 9, 12, 3, 3, 2), {"stride": (2, 3), "padding": (1, 0)}),
    ("dilation", (1, 3, 12, 11, 4, 3, 3), {"dilation": 2, "padding": 2}),
    ("dilation_pair_stride", (2, 2, 13, 9, 3, 3, 2), {"dilation": (3, 2), "stride": (2, 1)}),
    ("asymmetric_padding", (1, 3, 7, 8, 5, 3, 3), {"padding": ((2, 0), (1, 3))}),
    ("same_stride1_even_kernel", (1, 2, 7, 6, 3, 4, 2), {"padding": "same"}),
    ("same_stride2", (2, 3, 9, 10, 4, 3, 3), {"padding": "same", "stride": 2}),
    ("same_stride3_dilated", (1, 2, 10, 11, 3, 3, 2), {"padding": "same", "stride": (3, 2), "dilation": 2}),
    ("valid", (1, 2, 6, 6, 2, 3, 3), {"padding": "valid"}),
    ("reflect", (1, 3, 6, 7, 4, 3, 3), {"padding": 2, "padding_mode": "reflect"}),
    ("replicate", (2, 2, 5, 6, 3, 3, 3), {"padding": (1, 3), "padding_mode": "replicate"}),
    ("circular", (1, 3, 5, 5, 2, 3, 3), {"padding": ((2, 1), (0, 5)), "padding_mode": "circular"}),
    ("circular_same_stride2", (1, 2, 7, 8, 3, 3, 3), {"padding": "same", "stride": 2, "padding_mode": "circular"}),
    ("groups", (2, 6, 7, 7, 4, 3, 3), {"groups": 2, "padding": 1}),
    ("groups3_stride", (1, 6, 9, 8, 9, 2, 3), {"groups": 3, "stride": 2}),
    ("depthwise", (2, 4, 8, 7, 4, 3, 3), {"groups": 4, "padding": 1}),
    ("depthwise_multiplier2", (1, 3, 9, 9, 6, 3, 3), {"groups": 3, "padding": 1, "stride": 2}),
    ("depthwise_no_bias", (1, 5, 6, 6, 5, 5, 5), {"groups": 5, "padding": 2, "bias": False}),
    ("odd_sizes_wide_k", (3, 5, 13, 7, 19, 3, 5), {"padding": (1, 2)}),
    ("many_channels", (1, 33, 6, 9, 37, 3, 3), {"padding": 1}),
    ("pointwise_stride2", (2, 16, 9, 10, 24, 1, 1), {"stride": 2}),
    ("pointwise", (2, 16, 9, 10, 24, 1, 1), {}),
    ("pointwise_grouped", (3, 8, 5, 7, 6, 1, 1), {"groups": 2}),
    ("pointwise_dilated_padded", (1, 4, 5, 6, 3, 1, 1), {"padding": 1, "dilation": 2}),
    ("no_bias", (1, 4, 6, 6, 3, 3, 3), {"bias": False}),
    ("batch0", (0, 3, 6, 6, 2, 3, 3), {"padding": 1}),
    ("single_channel", (1, 1, 10, 10, 1, 3, 3), {}),
]


def run_case(algo, layout, dtype, shape, kwargs, seed=0):
    n, c, h, w, k, r, s = shape
    kwargs = dict(kwargs)
    use_bias = kwargs.pop("bias", True)
    groups = kwargs.get("groups", 1)
    rng = np.random.default_rng(seed)
    x, wt, b = make_problem(rng, n, c, h, w, k, r, s, groups=groups, dtype=dtype, bias=use_bias)
    expected = torch_conv2d(x, wt, b, **kwargs)
    weight_layout = "OIHW" if layout == "NCHW" else "HWIO"
    got = numbaconv.conv2d(to_act(x, layout), to_weight(wt, weight_layout), b, layout=layout,
                           algorithm=algo, **kwargs)
    assert got.dtype == dtype and got.flags.c_contiguous
    assert_close(got, to_act(expected, layout), dtype, c // groups * r * s)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("algo", HOST_ALGORITHMS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(case, algo, layout, dtype):
    _, shape, kwargs = case
    run_case(algo, layout, dtype, shape, kwargs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("weight_layout", ["OIHW", "HWIO", "OHWI"])
def test_every_weight_layout(layout, weight_layout):
    rng = np.random.default_rng(1)
    x, wt, b = make_problem(rng, 2, 4, 7, 6, 5, 3, 2)
    expected = to_act(torch_conv2d(x, wt, b, padding=1), layout)
    got = numbaconv.conv2d(to_act(x, layout), to_weight(wt, weight_layout), b, padding=1,
                           layout=layout, weight_layout=weight_layout)
    assert_close(got, expected, np.float32, 4 * 6)


@pytest.mark.parametrize("algo", HOST_ALGORITHMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_inputs(algo, layout):
    """Views with other strides: Fortran order, negative strides, slices."""
    rng = np.random.default_rng(2)
    x, wt, b = make_problem(rng, 2, 3, 9, 8, 4, 3, 3, dtype=np.float64)
    expected = to_act(torch_conv2d(x, wt, b, padding=1), layout)
    xl = to_act(x, layout)
    wl = to_weight(wt, "OIHW" if layout == "NCHW" else "HWIO")
    views = {
        "fortran": (np.asfortranarray(xl), np.asfortranarray(wl), b),
        "negative_strides": (xl[::-1][::-1], wl[::-1, ::-1][::-1, ::-1], b[::-1][::-1]),
        "strided_slices": (np.repeat(xl, 2, axis=3)[..., ::2], np.repeat(wl, 3, axis=0)[::3], np.repeat(b, 2)[::2]),
    }
    for name, (xv, wv, bv) in views.items():
        assert not (xv.flags.c_contiguous and wv.flags.c_contiguous and bv.flags.c_contiguous) or name != "strided_slices"
        got = numbaconv.conv2d(xv, wv, bv, padding=1, layout=layout, algorithm=algo)
        assert_close(got, expected, np.float64, 27)


def test_negative_stride_view_really_reversed():
    """A reversed view must be read as reversed (not as the underlying buffer)."""
    rng = np.random.default_rng(3)
    x, wt, b = make_problem(rng, 1, 2, 6, 7, 3, 3, 3, dtype=np.float64)
    xr = x[:, :, ::-1, ::-1]
    expected = torch_conv2d(np.ascontiguousarray(xr), wt, b)
    for algo in HOST_ALGORITHMS:
        assert_close(numbaconv.conv2d(xr, wt, b, algorithm=algo), expected, np.float64, 18)


@pytest.mark.parametrize("algo", HOST_ALGORITHMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_out_argument(algo, layout):
    rng = np.random.default_rng(4)
    x, wt, b = make_problem(rng, 2, 3, 6, 6, 4, 3, 3)
    expected = to_act(torch_conv2d(x, wt, b, stride=2, padding=1), layout)
    out = np.full(expected.shape, np.nan, dtype=np.float32)
    got = numbaconv.conv2d(to_act(x, layout), to_weight(wt, "OIHW" if layout == "NCHW" else "HWIO"), b,
                           stride=2, padding=1, layout=layout, algorithm=algo, out=out)
    assert got is out
    assert_close(out, expected, np.float32, 27)


@pytest.mark.parametrize("algo", HOST_ALGORITHMS)
def test_inputs_unchanged(algo):
    rng = np.random.default_rng(5)
    for kwargs in ({"padding": 1}, {"padding": 2, "padding_mode": "reflect"}, {"groups": 3, "padding": "same"}):
        x, wt, b = make_problem(rng, 2, 3, 7, 7, 3, 3, 3, groups=kwargs.get("groups", 1))
        copies = [a.copy() for a in (x, wt, b)]
        for layout in LAYOUTS:
            xl = to_act(x, layout) if layout == "NHWC" else x
            before = xl.copy()
            numbaconv.conv2d(xl, wt, b, layout=layout, weight_layout="OIHW", algorithm=algo, **kwargs)
            np.testing.assert_array_equal(xl, before)
        for a, c in zip((x, wt, b), copies):
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("algo", HOST_ALGORITHMS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_inf_propagate_like_torch(algo, layout):
    rng = np.random.default_rng(6)
    x, wt, b = make_problem(rng, 1, 3, 8, 8, 4, 3, 3, dtype=np.float64)
    x[0, 0, 2, 3] = np.nan
    x[0, 1, 6, 6] = np.inf
    x[0, 2, 0, 7] = -np.inf
    wt[1, 2, 1, 1] = np.inf
    expected = torch_conv2d(x, wt, b, padding=1)
    got = numbaconv.conv2d(to_act(x, layout), to_weight(wt, "OIHW"), b, padding=1, layout=layout,
                           weight_layout="OIHW", algorithm=algo)
    got = np.ascontiguousarray(np.transpose(got, (0, 3, 1, 2))) if layout == "NHWC" else got
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    finite = np.isfinite(expected)
    assert np.isnan(expected).any() and np.isinf(expected).any()
    np.testing.assert_allclose(got[finite], expected[finite], atol=1e-10)


def test_every_algorithm_gives_the_same_answer():
    rng = np.random.default_rng(7)
    x, wt, b = make_problem(rng, 2, 8, 11, 10, 12, 3, 3, groups=2)
    results = {a: numbaconv.conv2d(x, wt, b, groups=2, padding="same", stride=2, algorithm=a)
               for a in HOST_ALGORITHMS + ["auto"]}
    first = results["naive"]
    for name, y in results.items():
        np.testing.assert_allclose(y, first, atol=1e-4, err_msg=name)
