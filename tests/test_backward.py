"""Backward passes (grad-input, grad-weight, grad-bias) and conv_transpose2d, against torch
autograd in float64 (the oracle: tests/reference.py conventions; numbaconv is never its own
reference)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numbaconv
from reference import assert_close, explicit_padding, make_problem, pair, to_act, to_weight, torch_grads

LAYOUTS = ["NCHW", "NHWC"]
DTYPES = [np.float32, np.float64]

# (id, shape N C H W K R S, conv kwargs)
CASES = [
    ("basic", (2, 3, 8, 9, 4, 3, 3), {}),
    ("padded", (2, 3, 7, 6, 5, 3, 3), {"padding": 1}),
    ("stride2", (2, 3, 9, 10, 4, 3, 3), {"stride": 2, "padding": 1}),
    ("stride_gt_kernel", (1, 2, 11, 10, 3, 2, 2), {"stride": 3}),
    ("stride_pair", (1, 2, 9, 12, 3, 3, 2), {"stride": (2, 3), "padding": (1, 0)}),
    ("dilation", (1, 3, 12, 11, 4, 3, 3), {"dilation": 2, "padding": 2}),
    ("dilation_pair_stride", (2, 2, 13, 9, 3, 3, 2), {"dilation": (3, 2), "stride": (2, 1)}),
    ("asymmetric_padding", (1, 3, 7, 8, 5, 3, 3), {"padding": ((2, 0), (1, 3))}),
    ("pad_larger_than_kernel", (1, 2, 5, 5, 3, 2, 2), {"padding": 3}),
    ("same_even_kernel", (1, 2, 7, 6, 3, 4, 2), {"padding": "same"}),
    ("same_stride2", (2, 3, 9, 10, 4, 3, 3), {"padding": "same", "stride": 2}),
    ("same_stride3_dilated", (1, 2, 10, 11, 3, 3, 2), {"padding": "same", "stride": (3, 2), "dilation": 2}),
    ("valid", (1, 2, 6, 6, 2, 3, 3), {"padding": "valid"}),
    ("kernel_equals_padded_input", (2, 2, 5, 4, 3, 7, 6), {"padding": 1}),
    ("reflect", (1, 3, 6, 7, 4, 3, 3), {"padding": 2, "padding_mode": "reflect"}),
    ("reflect_stride2", (2, 2, 7, 6, 3, 3, 3), {"padding": ((2, 1), (0, 3)), "stride": 2, "padding_mode": "reflect"}),
    ("replicate", (2, 2, 5, 6, 3, 3, 3), {"padding": (1, 3), "padding_mode": "replicate"}),
    ("circular", (1, 3, 5, 5, 2, 3, 3), {"padding": ((2, 1), (0, 5)), "padding_mode": "circular"}),
    ("circular_same_stride2", (1, 2, 7, 8, 3, 3, 3), {"padding": "same", "stride": 2, "padding_mode": "circular"}),
    ("groups", (2, 6, 7, 7, 4, 3, 3), {"groups": 2, "padding": 1}),
    ("groups3_stride", (1, 6, 9, 8, 9, 2, 3), {"groups": 3, "stride": 2}),
    ("depthwise", (2, 4, 8, 7, 4, 3, 3), {"groups": 4, "padding": 1}),
    ("depthwise_stride2_dilated", (2, 4, 9, 9, 4, 3, 3), {"groups": 4, "padding": 2, "stride": 2, "dilation": 2}),
    ("depthwise_multiplier2", (1, 3, 9, 9, 6, 3, 3), {"groups": 3, "padding": 1, "stride": 2}),
    ("depthwise_reflect", (1, 3, 6, 6, 3, 3, 3), {"groups": 3, "padding": 1, "padding_mode": "reflect"}),
    ("pointwise_stride2", (2, 16, 9, 10, 24, 1, 1), {"stride": 2}),
    ("many_channels", (1, 33, 6, 9, 37, 3, 3), {"padding": 1}),
    ("single_channel", (1, 1, 10, 10, 1, 3, 3), {}),
    ("batch0", (0, 3, 6, 6, 2, 3, 3), {"padding": 1}),
]


def _setup(shape, kwargs, dtype, seed=0):
    n, c, h, w, k, r, s = shape
    rng = np.random.default_rng(seed)
    x, wt, b = make_problem(rng, max(n, 1), c, h, w, k, r, s, groups=kwargs.get("groups", 1), dtype=dtype)
    y_shape = _out_shape(x.shape, wt.shape, kwargs)
    gy = rng.standard_normal(y_shape).astype(dtype)
    return x[:n], wt, b, gy[:n]


def _out_shape(x_shape, w_shape, kwargs):
    stride, dilation = pair(kwargs.get("stride", 1)), pair(kwargs.get("dilation", 1))
    t, bo, l, r = explicit_padding(kwargs.get("padding", 0), x_shape[2:], w_shape[2:], stride, dilation)
    ho = (x_shape[2] + t + bo - dilation[0] * (w_shape[2] - 1) - 1) // stride[0] + 1
    wo = (x_shape[3] + l + r - dilation[1] * (w_shape[3] - 1) - 1) // stride[1] + 1
    return (x_shape[0], w_shape[0], ho, wo)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case_id,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_backward_matches_torch(case_id, shape, kwargs, layout, dtype):
    x, wt, b, gy = _setup(shape, kwargs, dtype)
    if shape[0] == 0:
        ex, ew, eb = np.zeros(x.shape), np.zeros(wt.shape), np.zeros(wt.shape[0])
    else:
        ex, ew, eb = torch_grads(x, wt, b, gy, **kwargs)
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    dx, dw, db = numbaconv.conv2d_backward(to_act(gy, layout), to_act(x, layout), to_weight(wt, wl),
                                           layout=layout, **kwargs)
    for got in (dx, dw, db):
        assert got.dtype == dtype and got.flags.c_contiguous
    n, c, h, w, k, r, s = shape
    g = kwargs.get("groups", 1)
    pixels = n * gy.shape[2] * gy.shape[3]
    assert_close(dx, to_act(ex, layout), dtype, (k // g) * r * s * 4)
    assert_close(dw, to_weight(ew, wl), dtype, pixels)
    assert_close(db, eb, dtype, pixels)


# Depthwise layers run their own fused kernels (numbaconv/grad/depthwise.py): NCHW
# stride-phase planes with 9-tap sweeps (3x3) or per-tap sweeps, row copies 8 values at a
# time with an overlapping tail (rows < 8, = 8, and 8 < W not a multiple of 8); NHWC
# contiguous pixel runs (stride 1, m = 1) or per-pixel channel loops, grad-input by the
# forward depthwise kernel on the flipped filter where the padding allows.
DEPTHWISE_CASES = [
    ("dw_s1_wide", (3, 5, 9, 21, 5, 3, 3), {"groups": 5, "padding": 1}),
    ("dw_s1_narrow", (2, 3, 5, 5, 3, 3, 3), {"groups": 3, "padding": 1}),
    ("dw_s1_w8", (1, 4, 8, 8, 4, 3, 3), {"groups": 4, "padding": 1}),
    ("dw_nopad", (2, 4, 7, 10, 4, 3, 3), {"groups": 4}),
    ("dw_pad_beyond_reach", (1, 3, 6, 7, 3, 3, 3), {"groups": 3, "padding": ((3, 0), (0, 4))}),
    ("dw_s2_even", (2, 6, 12, 12, 6, 3, 3), {"groups": 6, "padding": 1, "stride": 2}),
    ("dw_s2_odd", (1, 5, 11, 13, 5, 3, 3), {"groups": 5, "padding": 1, "stride": 2}),
    ("dw_stride_2_1", (1, 4, 9, 10, 4, 3, 3), {"groups": 4, "padding": 1, "stride": (2, 1)}),
    ("dw_stride_1_3", (1, 4, 9, 10, 4, 3, 3), {"groups": 4, "padding": (0, 2), "stride": (1, 3)}),
    ("dw_dilated_s1", (2, 4, 11, 12, 4, 3, 3), {"groups": 4, "padding": 2, "dilation": 2}),
    ("dw_dilated_pair", (1, 3, 12, 11, 3, 3, 3), {"groups": 3, "padding": (1, 2), "dilation": (1, 2)}),
    ("dw_5x5", (1, 4, 10, 9, 4, 5, 5), {"groups": 4, "padding": 2}),
    ("dw_2x4_s2", (2, 3, 9, 12, 3, 2, 4), {"groups": 3, "padding": (1, 1), "stride": 2}),
    ("dw_1x1_s2", (1, 4, 7, 9, 4, 1, 1), {"groups": 4, "stride": 2}),
    ("dw_m2_s1", (2, 3, 8, 9, 6, 3, 3), {"groups": 3, "padding": 1}),
    ("dw_m3_dilated", (1, 2, 9, 9, 6, 3, 3), {"groups": 2, "padding": 2, "dilation": 2}),
    ("dw_replicate", (1, 4, 6, 9, 4, 3, 3), {"groups": 4, "padding": 1, "padding_mode": "replicate"}),
    ("dw_circular_s2", (1, 3, 8, 7, 3, 3, 3), {"groups": 3, "padding": 1, "stride": 2, "padding_mode": "circular"}),
    ("dw_many_channels", (1, 40, 5, 6, 40, 3, 3), {"groups": 40, "padding": 1}),
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case_id,shape,kwargs", DEPTHWISE_CASES, ids=[c[0] for c in DEPTHWISE_CASES])
def test_depthwise_backward_matches_torch(case_id, shape, kwargs, layout):
    test_backward_matches_torch(case_id, shape, kwargs, layout, np.float64)
    test_backward_matches_torch(case_id, shape, kwargs, layout, np.float32)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("flags", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, False, True), (False, True, True)], ids=str)
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_partial_gradients(layout, flags, stride):
    """Each subset of the three gradients from the fused depthwise kernels."""
    kwargs = {"groups": 4, "padding": 1, "stride": stride}
    x, wt, b, gy = _setup((2, 4, 9, 11, 4, 3, 3), kwargs, np.float64, seed=3)
    ex, ew, eb = torch_grads(x, wt, b, gy, **kwargs)
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    got = numbaconv.conv2d_backward(to_act(gy, layout), to_act(x, layout), to_weight(wt, wl), layout=layout,
                                    input_grad=flags[0], weight_grad=flags[1], bias_grad=flags[2], **kwargs)
    for want, g, e in zip(flags, got, (to_act(ex, layout), to_weight(ew, wl), eb)):
        if want:
            assert_close(g, e, np.float64, 200)
        else:
            assert g is None


DX_METHOD_CASES = [c for c in CASES if pair(c[2].get("stride", 1)) == (1, 1)]


@pytest.mark.parametrize("method", ["conv", "gemm"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case_id,shape,kwargs", DX_METHOD_CASES, ids=[c[0] for c in DX_METHOD_CASES])
def test_grad_input_both_methods(case_id, shape, kwargs, layout, method, monkeypatch):
    """grad-input as a forward convolution of dY with flipped weights (stride 1, where the
    padding allows it) and as GEMM + col2im fold: both must match torch, whichever the
    size heuristic would pick."""
    import numbaconv.grad.backward as backward

    monkeypatch.setattr(backward, "_DX_METHOD", method)
    x, wt, b, gy = _setup(shape, kwargs, np.float64, seed=4)
    if shape[0] == 0:
        ex = np.zeros(x.shape)
    else:
        ex = torch_grads(x, wt, b, gy, **kwargs)[0]
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    dx = numbaconv.conv2d_backward_input(to_act(gy, layout), to_act(x, layout).shape, to_weight(wt, wl),
                                         layout=layout, **kwargs)
    assert_close(dx, to_act(ex, layout), np.float64, 1000)


@pytest.mark.parametrize("method", ["shifts", "im2col", "stream", "tiles"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case_id,shape,kwargs", CASES, ids=[c[0] for c in CASES])
def test_grad_weight_both_methods(case_id, shape, kwargs, layout, method, monkeypatch):
    """grad-weight by shifted GEMMs (stride 1, else im2col), by im2col GEMM and by the
    streaming row kernel (any geometry, auto's choice for few channels)."""
    import numbaconv.grad.backward as backward

    monkeypatch.setattr(backward, "_DW_METHOD", method)
    x, wt, b, gy = _setup(shape, kwargs, np.float64, seed=6)
    ew = np.zeros(wt.shape) if shape[0] == 0 else torch_grads(x, wt, b, gy, **kwargs)[1]
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    dw = numbaconv.conv2d_backward_weight(to_act(gy, layout), to_act(x, layout), to_weight(wt, wl).shape,
                                          layout=layout, **kwargs)
    assert_close(dw, to_weight(ew, wl), np.float64, 1000)


@pytest.mark.parametrize("weight_layout", ["OIHW", "HWIO", "OHWI"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_weight_layouts_and_strided_inputs(layout, weight_layout):
    kwargs = {"stride": 2, "padding": 1, "groups": 2}
    x, wt, b, gy = _setup((2, 4, 9, 8, 6, 3, 3), kwargs, np.float64, seed=3)
    ex, ew, eb = torch_grads(x, wt, b, gy, **kwargs)
    # non-contiguous views of every array: reversed width, Fortran order
    xa = np.asfortranarray(to_act(x, layout))
    ga = to_act(gy, layout)[..., ::-1].copy()[..., ::-1]
    wa = np.asfortranarray(to_weight(wt, weight_layout))
    dx, dw, db = numbaconv.conv2d_backward(ga, xa, wa, layout=layout, weight_layout=weight_layout, **kwargs)
    assert_close(dx, to_act(ex, layout), np.float64, 100)
    assert_close(dw, to_weight(ew, weight_layout), np.float64, 100)
    assert_close(db, eb, np.float64, 100)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kwargs", [{"padding": 1}, {"padding": 1, "stride": 2, "groups": 2}, {"dilation": 2}],
                         ids=["pad", "stride2_groups", "dilated"])
def test_grad_weight_tiles_several_per_thread(layout, kwargs, monkeypatch):
    """Per-thread im2col tiles: tiny tiles, so each thread runs several, across images."""
    import numbaconv.grad.backward as backward

    monkeypatch.setattr(backward, "_DW_METHOD", "tiles")
    monkeypatch.setattr(backward, "_TILE_BYTES", 1)
    monkeypatch.setattr(backward, "_TILE_MIN_PIXELS", 1)
    x, wt, b, gy = _setup((3, 4, 11, 9, 6, 3, 3), kwargs, np.float64, seed=11)
    ew = torch_grads(x, wt, b, gy, **kwargs)[1]
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    dw = numbaconv.conv2d_backward_weight(to_act(gy, layout), to_act(x, layout), to_weight(wt, wl).shape,
                                          layout=layout, **kwargs)
    assert_close(dw, to_weight(ew, wl), np.float64, 1000)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_separate_gradient_functions(layout):
    kwargs = {"stride": (1, 2), "padding": ((1, 0), (2, 1)), "dilation": (2, 1), "padding_mode": "reflect"}
    x, wt, b, gy = _setup((2, 3, 8, 9, 4, 3, 3), kwargs, np.float64, seed=5)
    ex, ew, eb = torch_grads(x, wt, b, gy, **kwargs)
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    xa, wa, ga = to_act(x, layout), to_weight(wt, wl), to_act(gy, layout)
    dx = numbaconv.conv2d_backward_input(ga, xa.shape, wa, layout=layout, **kwargs)
    dw = numbaconv.conv2d_backward_weight(ga, xa, wa.shape, layout=layout, **kwargs)
    db = numbaconv.conv2d_backward_bias(ga, layout=layout)
    assert_close(dx, to_act(ex, layout), np.float64, 100)
    assert_close(dw, to_weight(ew, wl), np.float64, 100)
    assert_close(db, eb, np.float64, 100)
    only_w = numbaconv.conv2d_backward(ga, xa, wa, layout=layout, input_grad=False, bias_grad=False, **kwargs)
    assert only_w[0] is None and only_w[2] is None
    assert_close(only_w[1], dw, np.float64, 1)


@pytest.mark.parametrize("shape,kwargs", [((3, 5, 9, 7, 6, 3, 3), {"padding": 1, "stride": (2, 1)}),
                                          ((2, 4, 7, 6, 6, 3, 3), {"padding": 1, "groups": 2})],
                         ids=["strided", "groups"])
def test_backward_small_workspace_chunks(shape, kwargs):
    """A tiny im2col workspace forces many chunks (one output row each): the first chunk
    writes each group's grad-weight, every later one (rows, images) adds to it."""
    from numbaconv.cpu.im2col import set_workspace_bytes

    x, wt, b, gy = _setup(shape, kwargs, np.float64, seed=7)
    ex, ew, eb = torch_grads(x, wt, b, gy, **kwargs)
    previous = set_workspace_bytes(64)
    try:
        for layout, wl in (("NCHW", "OIHW"), ("NHWC", "HWIO")):
            dx, dw, _ = numbaconv.conv2d_backward(to_act(gy, layout), to_act(x, layout), to_weight(wt, wl),
                                                  layout=layout, **kwargs)
            assert_close(dx, to_act(ex, layout), np.float64, 100)
            assert_close(dw, to_weight(ew, wl), np.float64, 100)
    finally:
        set_workspace_bytes(previous)


def test_nan_propagates():
    x, wt, b, gy = _setup((1, 2, 6, 6, 2, 3, 3), {}, np.float64)
    gy[0, 0, 1, 1] = np.nan
    dx, dw, db = numbaconv.conv2d_backward(gy, x, wt)
    assert np.isnan(dx).any() and np.isnan(dw).any() and np.isnan(db[0])


INF_CASES = [
    ("dense", (1, 4, 6, 7, 5, 3, 3), {}),
    ("dense_padded", (1, 40, 6, 7, 8, 3, 3), {"padding": 1}),          # shifted GEMMs (NHWC, C >= 32)
    ("few_channels", (2, 3, 8, 9, 3, 3, 3), {"padding": (0, 1)}),
    ("depthwise", (1, 8, 6, 7, 8, 3, 3), {"groups": 8}),
    ("depthwise_dilated", (1, 8, 9, 9, 16, 3, 3), {"groups": 8, "padding": 1, "dilation": 2}),
    ("depthwise_stride2", (1, 8, 9, 10, 8, 3, 3), {"groups": 8, "padding": 1, "stride": 2}),
]


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case_id,shape,kwargs", INF_CASES, ids=[c[0] for c in INF_CASES])
def test_inf_in_x_gives_torchs_weight_gradient(case_id, shape, kwargs, layout):
    """Inf and NaN in x, at edges some taps never read: dW is inf/nan exactly where torch's is
    (the fast paths' zero-extended dY rows would otherwise turn 0 * inf into nan)."""
    x, wt, b, gy = _setup(shape, kwargs, np.float64)
    x[0, 0, 2, -1] = np.inf
    x[0, -1, -1, 0] = -np.inf
    x[-1, 1, 0, 1] = np.nan
    dx, dw, db = torch_grads(x, wt, b, gy, **kwargs)
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    gx, gw, gb = numbaconv.conv2d_backward(to_act(gy, layout), to_act(x, layout), to_weight(wt, wl), layout=layout,
                                           weight_layout=wl, **kwargs)
    expected = to_weight(dw, wl)
    np.testing.assert_array_equal(np.isnan(gw), np.isnan(expected))
    np.testing.assert_array_equal(np.isinf(gw), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(gw[finite], expected[finite], rtol=1e-9, atol=1e-9)


def test_inputs_not_modified():
    x, wt, b, gy = _setup((1, 2, 6, 6, 2, 3, 3), {"padding": 1, "padding_mode": "circular"}, np.float32)
    copies = [a.copy() for a in (x, wt, gy)]
    numbaconv.conv2d_backward(gy, x, wt, padding=1, padding_mode="circular")
    for a, c in zip((x, wt, gy), copies):
        np.testing.assert_array_equal(a, c)


# --- errors ----------------------------------------------------------------------------------
def test_backward_errors():
    x = np.zeros((1, 2, 6, 6), np.float32)
    w = np.zeros((3, 2, 3, 3), np.float32)
    gy = np.zeros((1, 3, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"grad_output has shape \(1, 3, 5, 5\)"):
        numbaconv.conv2d_backward(np.zeros((1, 3, 5, 5), np.float32), x, w)
    with pytest.raises(TypeError, match="grad_output has dtype float64"):
        numbaconv.conv2d_backward(gy.astype(np.float64), x, w)
    with pytest.raises(TypeError, match="grad_output must be a numpy.ndarray"):
        numbaconv.conv2d_backward(gy.tolist(), x, w)
    with pytest.raises(ValueError, match="groups=4"):
        numbaconv.conv2d_backward(gy, x, w, groups=4)
    with pytest.raises(ValueError, match="stride"):
        numbaconv.conv2d_backward(gy, x, w, stride=0)
    with pytest.raises(ValueError, match="input_shape"):
        numbaconv.conv2d_backward_input(gy, (1, 2, 6), w)
    with pytest.raises(ValueError, match="weight_shape"):
        numbaconv.conv2d_backward_weight(gy, x, (3, 2, -1, 3))
    with pytest.raises(ValueError, match="layout"):
        numbaconv.conv2d_backward_bias(gy, layout="NCWH")


# --- conv_transpose2d ------------------------------------------------------------------------
# (id, N, C_in, H, W, C_out, R, S, kwargs)
TRANSPOSE_CASES = [
    ("basic", 2, 3, 5, 6, 4, 3, 3, {}),
    ("stride2", 2, 3, 5, 4, 4, 3, 3, {"stride": 2}),
    ("stride2_pad1_outpad1", 1, 4, 5, 5, 3, 3, 3, {"stride": 2, "padding": 1, "output_padding": 1}),
    ("stride_pair_outpad_pair", 1, 2, 4, 5, 3, 3, 2, {"stride": (3, 2), "padding": (1, 0), "output_padding": (2, 1)}),
    ("dilation", 2, 3, 5, 5, 2, 3, 3, {"dilation": 2, "padding": 1}),
    ("dilation_outpad", 1, 2, 4, 4, 2, 3, 3, {"dilation": 3, "output_padding": 2}),
    ("groups", 2, 4, 5, 5, 6, 3, 3, {"groups": 2, "stride": 2, "padding": 1}),
    ("depthwise", 1, 4, 6, 5, 4, 3, 3, {"groups": 4, "stride": 2, "output_padding": 1}),
    ("depthwise_multiplier", 1, 3, 4, 4, 6, 2, 2, {"groups": 3, "stride": 2}),
    ("pad_crops", 1, 2, 6, 6, 3, 3, 3, {"padding": 2}),
    ("kernel_1x1_stride2", 2, 8, 4, 3, 5, 1, 1, {"stride": 2}),
    ("no_bias", 1, 2, 4, 4, 3, 4, 4, {"stride": 2, "padding": 1, "bias": False}),
    ("batch0", 0, 2, 4, 4, 3, 3, 3, {"stride": 2}),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", TRANSPOSE_CASES, ids=[c[0] for c in TRANSPOSE_CASES])
def test_conv_transpose2d_matches_torch(case, layout, dtype):
    _, n, c_in, h, w, c_out, r, s, kwargs = case
    kwargs = dict(kwargs)
    use_bias = kwargs.pop("bias", True)
    groups = kwargs.get("groups", 1)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((n, c_in, h, w)).astype(dtype)
    wt = rng.standard_normal((c_in, c_out // groups, r, s)).astype(dtype)  # torch's order
    b = rng.standard_normal(c_out).astype(dtype) if use_bias else None
    expected = F.conv_transpose2d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(wt.astype(np.float64)),
                                  None if b is None else torch.from_numpy(b.astype(np.float64)), **kwargs).numpy()
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    got = numbaconv.conv_transpose2d(to_act(x, layout), to_weight(wt, wl), b, layout=layout, **kwargs)
    assert got.dtype == dtype and got.flags.c_contiguous
    assert_close(got, to_act(expected, layout), dtype, c_in * r * s)


def test_conv_transpose2d_weight_layout_ohwi():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 5, 5))
    wt = rng.standard_normal((4, 3, 3, 3))
    expected = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(wt), stride=2, padding=1).numpy()
    got = numbaconv.conv_transpose2d(to_act(x, "NHWC"), to_weight(wt, "OHWI"), stride=2, padding=1,
                                     layout="NHWC", weight_layout="OHWI")
    assert_close(got, to_act(expected, "NHWC"), np.float64, 36)


def test_conv_transpose2d_errors():
    x = np.zeros((1, 4, 5, 5), np.float32)
    w = np.zeros((4, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="output_padding"):
        numbaconv.conv_transpose2d(x, w, stride=2, output_padding=2)
    with pytest.raises(ValueError, match="output_padding"):
        numbaconv.conv_transpose2d(x, w, output_padding=-1)
    with pytest.raises(ValueError, match="weight"):
        numbaconv.conv_transpose2d(x, np.zeros((3, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match="padding"):
        numbaconv.conv_transpose2d(x, w, padding="same")
    with pytest.raises(ValueError, match="bias"):
        numbaconv.conv_transpose2d(x, w, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="weight has dtype float64"):
        numbaconv.conv_transpose2d(x, w.astype(np.float64))
    with pytest.raises(ValueError, match="output size"):
        numbaconv.conv_transpose2d(np.zeros((1, 4, 1, 1), np.float32), w, padding=2)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kwargs", [{"padding": 0, "groups": 3}, {"padding": 1}, {"padding": 0}],
                         ids=["depthwise_nopad", "dense_pad", "dense_nopad"])
def test_results_are_not_reused_scratch(layout, kwargs):
    """Backward keeps reusable scratch buffers: results must never alias them."""
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    x, wt, b, gy = _setup((1, 3, 40, 40, 3, 3, 3), kwargs, np.float64, seed=8)
    first = numbaconv.conv2d_backward(to_act(gy, layout), to_act(x, layout), to_weight(wt, wl), layout=layout,
                                      **kwargs)
    kept = [a.copy() for a in first]
    numbaconv.conv2d_backward(to_act(gy * 3 + 1, layout), to_act(x * 2, layout), to_weight(wt - 1, wl),
                              layout=layout, **kwargs)
    for a, k in zip(first, kept):
        np.testing.assert_array_equal(a, k)


@pytest.mark.parametrize("transa", [False, True])
@pytest.mark.parametrize("transb", [False, True])
@pytest.mark.parametrize("m,n", [(70, 33), (33, 70), (5, 3)], ids=["split_m", "split_n", "tiny"])
def test_split_gemm_matches_numpy(transa, transb, m, n):
    """The thread-split GEMM behind the backward passes, on strided sub-matrices with offsets."""
    from numbaconv.grad.backward import _gemm_par

    rng = np.random.default_rng(0)
    k, lda, ldb, ldc = 19, 80, 90, 75
    a = rng.standard_normal(3 + lda * 80)
    b = rng.standard_normal(5 + ldb * 80)
    c = rng.standard_normal(7 + ldc * 80)

    def colmajor(buf, off, ld, rows, cols):
        return np.lib.stride_tricks.as_strided(buf[off:], (rows, cols), (8, 8 * ld))

    op_a = colmajor(a, 3, lda, k, m).T if transa else colmajor(a, 3, lda, m, k)
    op_b = colmajor(b, 5, ldb, n, k).T if transb else colmajor(b, 5, ldb, k, n)
    expected = c.copy()
    colmajor(expected, 7, ldc, m, n)[...] = op_a @ op_b + 0.5 * colmajor(c, 7, ldc, m, n)
    _gemm_par(2, transa, transb, m, n, k, a, 3, lda, b, 5, ldb, 0.5, c, 7, ldc)
    np.testing.assert_allclose(c, expected, rtol=1e-12, atol=1e-12)
