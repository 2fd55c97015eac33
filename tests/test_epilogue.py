"""The fused epilogue, ``conv2d(..., activation=, residual=)``: every activation x residual
form x host algorithm x layout x dtype against torch in float64, on layers that reach each
kernel path (and the paths that fuse it must not make a second pass over the result)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numbaconv
from numbaconv.cpu import epilogue
from numbaconv.registry import REGISTRY
from reference import make_problem, to_act, to_weight, tolerance, torch_conv2d

HOST = [name for name in numbaconv.algorithms() if REGISTRY[name].host]
ACTIVATIONS = [None, "relu", "relu6", "silu", "hardswish"]
TORCH = {None: lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "hardswish": F.hardswish}

# (id, N C H W K R S, kwargs): which kernel each reaches is noted (tiled/auto dispatch)
PATHS = [
    ("winograd_or_tiled_3x3", (2, 16, 9, 10, 32, 3, 3), {"padding": 1}),
    ("tiled_strided_5x5", (1, 8, 11, 9, 24, 5, 5), {"stride": 2, "padding": 2}),
    ("tiled_1x1_stride2", (2, 16, 8, 9, 40, 1, 1), {"stride": 2}),
    ("dot_deep_nchw", (1, 128, 5, 5, 256, 3, 3), {"padding": 1}),
    ("depthwise_3x3", (2, 16, 7, 9, 16, 3, 3), {"groups": 16, "padding": 1}),
    ("depthwise_5x5", (1, 8, 9, 8, 8, 5, 5), {"groups": 8, "padding": 2}),
    ("streaming_few_channels", (1, 3, 10, 9, 4, 3, 3), {"padding": 1}),
    ("compacted_far_padding", (1, 4, 5, 5, 6, 3, 3), {"padding": 9}),
    ("reflect", (1, 4, 6, 7, 8, 3, 3), {"padding": 2, "padding_mode": "reflect"}),
    ("winograd_wide_padding", (1, 16, 8, 8, 16, 3, 3), {"padding": 3}),
    ("pointwise_1x1", (2, 16, 12, 11, 24, 1, 1), {}),
]


def _expected(x, wt, b, res, activation, kwargs):
    y = torch_conv2d(x, wt, b, **kwargs)
    if res is not None:
        y = y + res
    return TORCH[activation](torch.from_numpy(y)).numpy()


def _case(shape, kwargs, dtype, seed=0):
    n, c, h, w, k, r, s = shape
    rng = np.random.default_rng(seed)
    x, wt, b = make_problem(rng, n, c, h, w, k, r, s, groups=kwargs.get("groups", 1), dtype=dtype)
    y = torch_conv2d(x, wt, b, **kwargs)
    res = rng.standard_normal(y.shape).astype(dtype)
    return x, wt, b, res, c // kwargs.get("groups", 1) * r * s


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("algorithm", HOST)
@pytest.mark.parametrize("name,shape,kwargs", PATHS, ids=[p[0] for p in PATHS])
def test_every_activation_and_residual_against_torch(name, shape, kwargs, algorithm, layout):
    for dtype in (np.float32, np.float64):
        x, wt, b, res, red = _case(shape, kwargs, dtype)
        xa, wa = to_act(x, layout), to_weight(wt, "OIHW" if layout == "NCHW" else "HWIO")
        ra = to_act(res, layout)
        tol = tolerance(dtype, red) * 4  # silu / hardswish scale errors by at most ~1.1
        for activation in ACTIVATIONS:
            for residual in (None, ra):
                want = to_act(_expected(x, wt, b, None if residual is None else res, activation, kwargs), layout)
                got = numbaconv.conv2d(xa, wa, b, layout=layout, algorithm=algorithm, activation=activation,
                                       residual=residual, **kwargs)
                assert got.dtype == dtype
                np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=f"{activation} {residual is None}")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name,shape,kwargs", [("pointwise", (2, 16, 12, 11, 24, 1, 1), {}),
                                               ("conv_3x3", (2, 8, 12, 11, 24, 3, 3), {"padding": 1})])
def test_im2col_finishes_each_chunk_and_tile(name, shape, kwargs, layout, monkeypatch):
    """im2col applies the bias and epilogue to each chunk of pixels (1x1) or tile of rows right
    after its GEMMs: with the smallest chunks and tiles every output is finished exactly once
    (twice would add the bias or residual twice)."""
    from numbaconv.cpu import im2col

    monkeypatch.setattr(im2col, "CHUNK_BYTES", 1)  # NCHW: 64-pixel chunks, several per thread
    monkeypatch.setattr(im2col, "TILE_BYTES", 1)  # one output row per tile
    x, wt, b, res, red = _case(shape, kwargs, np.float32, seed=3)
    xa, wa = to_act(x, layout), to_weight(wt, "OIHW" if layout == "NCHW" else "HWIO")
    for activation in ACTIVATIONS:
        for residual in (None, to_act(res, layout)):
            want = to_act(_expected(x, wt, b, None if residual is None else res, activation, kwargs), layout)
            got = numbaconv.conv2d(xa, wa, b, layout=layout, algorithm="im2col", activation=activation,
                                   residual=residual, **kwargs)
            np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(np.float32, red) * 4,
                                       err_msg=f"{activation} {residual is None}")


@pytest.mark.parametrize("algorithm", HOST)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_out_may_be_the_residual_and_residual_may_be_a_view(algorithm, layout):
    shape, kwargs = (2, 16, 8, 8, 16, 3, 3), {"padding": 1}
    x, wt, b, res, red = _case(shape, kwargs, np.float32, seed=1)
    xa, wa = to_act(x, layout), to_weight(wt, "OIHW" if layout == "NCHW" else "HWIO")
    want = to_act(_expected(x, wt, b, res, "relu", kwargs), layout)
    out = to_act(res, layout).copy()  # in place: out = relu(conv + out)
    got = numbaconv.conv2d(xa, wa, b, layout=layout, algorithm=algorithm, activation="relu", residual=out, out=out,
                           **kwargs)
    assert got is out
    np.testing.assert_allclose(out, want, rtol=0, atol=tolerance(np.float32, red))
    # a residual with other strides (a Fortran-ordered copy, a reversed view) is read as it is
    reversed_rows = np.ascontiguousarray(to_act(res, layout)[:, ::-1])[:, ::-1]  # same values, negative stride
    for view in (np.asfortranarray(to_act(res, layout)), reversed_rows):
        before = view.copy()
        got = numbaconv.conv2d(xa, wa, b, layout=layout, algorithm=algorithm, activation="relu", residual=view,
                               **kwargs)
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance(np.float32, red))
        np.testing.assert_array_equal(view, before)  # inputs are never modified


@pytest.mark.parametrize("name,shape,kwargs,layout", [
    ("winograd", (1, 16, 8, 8, 32, 3, 3), {"padding": 1}, "NCHW"),
    ("winograd_nhwc", (1, 16, 9, 7, 32, 3, 3), {"padding": 1}, "NHWC"),
    ("tiled", (1, 16, 8, 8, 32, 3, 3), {"padding": 1, "stride": 2}, "NCHW"),
    ("tiled_nhwc", (1, 16, 8, 8, 32, 3, 3), {"padding": 1, "stride": 2}, "NHWC"),
    ("dot", (1, 128, 5, 5, 256, 3, 3), {"padding": 1}, "NCHW"),
    ("depthwise", (1, 32, 8, 8, 32, 3, 3), {"padding": 1, "groups": 32}, "NCHW"),
    ("depthwise_nhwc", (1, 32, 8, 8, 32, 3, 3), {"padding": 1, "groups": 32}, "NHWC"),
    ("im2col_pointwise", (2, 16, 8, 8, 24, 1, 1), {}, "NCHW"),
    ("im2col_pointwise_nhwc", (2, 16, 8, 8, 24, 1, 1), {}, "NHWC"),
    ("im2col_3x3", (1, 8, 8, 8, 16, 3, 3), {"padding": 1}, "NCHW"),
])
def test_the_fast_paths_fuse_it(name, shape, kwargs, layout, monkeypatch):
    """The kernels of these paths apply the epilogue to their own blocks: the pass over the
    whole result (``epilogue.apply``) never runs."""
    passes = []
    real = epilogue.apply
    monkeypatch.setattr(epilogue, "apply", lambda *a: passes.append(1) or real(*a))
    x, wt, b, res, red = _case(shape, kwargs, np.float32, seed=2)
    xa, wa = to_act(x, layout), to_weight(wt, "OIHW" if layout == "NCHW" else "HWIO")
    algorithm = name.split("_")[0] if name.startswith(("winograd", "im2col")) else "tiled"
    got = numbaconv.conv2d(xa, wa, b, layout=layout, algorithm=algorithm, activation="hardswish",
                           residual=to_act(res, layout), **kwargs)
    np.testing.assert_allclose(got, to_act(_expected(x, wt, b, res, "hardswish", kwargs), layout), rtol=0,
                               atol=tolerance(np.float32, red) * 4)
    assert passes == []


def test_special_values_as_torch():
    """NaN stays NaN, relu(-0.0) is -0.0, silu(-inf) and hardswish(-inf) are NaN -- as torch's
    functions, for the kernels and for the plain-Python reference."""
    v = np.array([np.nan, np.inf, -np.inf, -100.0, -3.0, -1.5, -0.0, 0.0, 2.9, 3.0, 7.0, 100.0])
    for dtype in (np.float32, np.float64):
        for activation in ACTIVATIONS[1:]:
            want = TORCH[activation](torch.from_numpy(v.astype(dtype))).numpy()
            got = v.astype(dtype)
            epilogue.apply(got, None, epilogue.CODES[activation])
            np.testing.assert_allclose(got, want, rtol=2e-7, atol=0, equal_nan=True)
            np.testing.assert_array_equal(np.signbit(got[~np.isnan(got)]), np.signbit(want[~np.isnan(want)]))
            py = np.array([epilogue.python_reference(float(t), activation) for t in v.astype(dtype)])
            np.testing.assert_allclose(py.astype(dtype), want, rtol=2e-7, atol=1e-37, equal_nan=True)  # f32 denormals


@pytest.mark.parametrize("algorithm", HOST)
def test_nan_and_inf_reach_the_activation(algorithm):
    x = np.zeros((1, 16, 6, 6), np.float32)
    x[0, 3, 2, 2] = np.nan
    x[0, 5, 4, 1] = -np.inf
    w = np.ones((16, 16, 3, 3), np.float32)
    for activation in ACTIVATIONS:
        got = numbaconv.conv2d(x, w, padding=1, algorithm=algorithm, activation=activation)
        want = TORCH[activation](torch.from_numpy(torch_conv2d(x, w, padding=1))).numpy()
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=str(activation))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=str(activation))


def test_unbatched_residual():
    x, wt, b, res, red = _case((1, 4, 6, 6, 8, 3, 3), {"padding": 1}, np.float64)
    got = numbaconv.conv2d(x[0], wt, b, padding=1, activation="relu6", residual=res[0])
    assert got.shape == res[0].shape
    np.testing.assert_allclose(got, _expected(x, wt, b, res, "relu6", {"padding": 1})[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="residual must be 3-D"):
        numbaconv.conv2d(x[0], wt, b, padding=1, residual=res)


def test_errors_name_the_argument():
    x = np.zeros((1, 2, 5, 5), np.float32)
    w = np.zeros((3, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="activation must be None or one of .*'gelu'"):
        numbaconv.conv2d(x, w, activation="gelu")
    with pytest.raises(ValueError, match="activation must be"):
        numbaconv.conv2d(x, w, activation=torch.relu)
    with pytest.raises(TypeError, match="residual must be None or a numpy.ndarray, got list"):
        numbaconv.conv2d(x, w, residual=[0.0])
    with pytest.raises(TypeError, match="residual has dtype float64"):
        numbaconv.conv2d(x, w, residual=np.zeros((1, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"residual has shape \(1, 3, 3, 4\)"):
        numbaconv.conv2d(x, w, residual=np.zeros((1, 3, 3, 4), np.float32))
    big = np.zeros((1, 3, 3, 6), np.float32)
    part = big.reshape(-1)[1:28].reshape(1, 3, 3, 3)  # C-contiguous, overlapping big[..., ::2]
    with pytest.raises(ValueError, match="out overlaps residual"):
        numbaconv.conv2d(x, w, residual=big[..., ::2], out=part)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        xx = np.zeros((1, 3, 3, 3), np.float32)
        numbaconv.conv2d(xx, np.zeros((3, 3, 1, 1), np.float32), residual=xx, out=xx)


def test_silu_accuracy_over_its_range():
    """silu's exp is numbaconv's own (a polynomial, so the loops vectorise): within a few
    float32 ulps of torch in float64 over the whole range, exact to float64 rounding there."""
    v64 = np.concatenate([np.linspace(-100, 100, 200001), np.linspace(-1, 1, 20001), [-87.5, 88.5, -708.5]])
    want = F.silu(torch.from_numpy(v64)).numpy()
    for dtype, rel in ((np.float32, 4e-6), (np.float64, 1e-14)):
        v = v64.astype(dtype)
        got = v.copy()
        epilogue.apply(got, None, epilogue.CODES["silu"])
        ref = F.silu(torch.from_numpy(v.astype(np.float64))).numpy()
        # below the smallest normal float32, exp(-v) overflows in float32 (in torch too): -0.0
        floor = 1e3 * np.finfo(dtype).tiny
        assert np.all(np.abs(got - ref) <= rel * np.abs(ref) + floor), dtype
        assert want.shape == got.shape


def test_activation_loops_vectorise(tmp_path):
    """The activation loops compile to packed FMAs (a scalar libm exp, or Python's
    division-by-zero check, would keep them scalar); compiled afresh in a subprocess."""
    import subprocess
    import sys
    code = (
        "import re, numba, numpy as np\n"
        "from numbaconv.cpu import epilogue as e\n"
        "a, i = numba.float32[::1], numba.int64\n"
        "sig = (a, a, i, i, i, numba.boolean)\n"
        "e.finish.compile(sig)  # (the kernel compiled callers link; a Python call runs a wrapped twin)\n"
        "asm = e.finish.inspect_asm(sig)\n"
        "print(len(re.findall(r'vfmadd\\S*ps\\s+%[xyz]mm', asm)), len(re.findall(r'vdivps', asm)))\n")
    env = dict(__import__("os").environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    fmas, divs = map(int, out.stdout.split())
    assert fmas >= 6 and divs >= 1, out.stdout
