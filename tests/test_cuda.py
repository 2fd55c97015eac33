"""``algorithm="cuda"``: both kernels against torch float64, in the CUDA simulator (or on a GPU).

The simulator runs every GPU thread in Python, so shapes are tiny.  ``tests/cuda_sim.py``
switches it on before ``numba.cuda`` is first imported, unless ``NUMBA_ENABLE_CUDASIM`` is
already set (``NUMBA_ENABLE_CUDASIM=0 pytest tests/test_cuda.py`` runs on a real GPU).  The
variable is then restored, and set again only around these tests, so other modules do
not see ``"cuda"`` in ``algorithms()``.  ``test_ptx_sm90`` compiles every kernel to PTX in a
fresh process with the real CUDA target (the simulator type-checks nothing).
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import numbaconv
from cuda_sim import HAVE_NUMBA_CUDA, bind
from cuda_sim import reload_numba_config as _reload_numba_config
from numbaconv.cuda import conv as cuda_conv

cuda, SIM, USABLE = bind()

from reference import assert_close, make_problem, to_act, to_weight, torch_conv2d, torch_grads  # noqa: E402

REASON = ("numba-cuda is not installed (pip install -e '.[test]')" if not HAVE_NUMBA_CUDA else
          "numba.cuda was imported in hardware mode before this module and there is no GPU")
needs_cuda = pytest.mark.skipif(not USABLE, reason=REASON)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _simulator_env():
    """``available()`` counts the simulator only while NUMBA_ENABLE_CUDASIM asks for it."""
    if not SIM:
        yield
        return
    prior = os.environ.get("NUMBA_ENABLE_CUDASIM")
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    _reload_numba_config()
    try:
        yield
    finally:
        if prior is None:
            os.environ.pop("NUMBA_ENABLE_CUDASIM", None)
        else:
            os.environ["NUMBA_ENABLE_CUDASIM"] = prior
        _reload_numba_config()


# (id, shape N C H W K R S, conv kwargs) -- tiny: the simulator runs ~1 ms per thread
CASES = [
    ("basic", (2, 3, 5, 6, 4, 3, 3), {}),
    ("stride_pair", (1, 2, 7, 8, 3, 3, 2), {"stride": (2, 3), "padding": (1, 0)}),
    ("dilation_pair_stride", (1, 2, 9, 7, 3, 3, 2), {"dilation": (3, 2), "stride": (2, 1)}),
    ("asymmetric_padding", (1, 3, 5, 6, 5, 3, 3), {"padding": ((2, 0), (1, 3))}),
    ("same_stride2", (2, 3, 6, 7, 4, 3, 3), {"padding": "same", "stride": 2}),
    ("valid_kernel_equals_input", (1, 3, 4, 5, 2, 4, 5), {"padding": "valid"}),
    ("kernel_equals_padded_input", (1, 2, 4, 3, 3, 6, 5), {"padding": 1}),
    ("reflect", (1, 3, 5, 6, 4, 3, 3), {"padding": 2, "padding_mode": "reflect"}),
    ("replicate", (2, 2, 4, 5, 3, 3, 3), {"padding": (1, 3), "padding_mode": "replicate"}),
    ("circular", (1, 3, 5, 5, 2, 3, 3), {"padding": ((2, 1), (0, 5)), "padding_mode": "circular"}),
    ("circular_same_stride2", (1, 2, 7, 6, 3, 3, 3), {"padding": "same", "stride": 2, "padding_mode": "circular"}),
    ("groups", (1, 6, 5, 5, 4, 3, 3), {"groups": 2, "padding": 1}),
    ("groups3_stride", (1, 6, 7, 6, 9, 2, 3), {"groups": 3, "stride": 2}),
    ("depthwise", (2, 4, 5, 4, 4, 3, 3), {"groups": 4, "padding": 1}),
    ("depthwise_multiplier2", (1, 3, 6, 6, 6, 3, 3), {"groups": 3, "padding": 1, "stride": 2}),
    ("no_bias_pointwise_stride2", (2, 5, 6, 7, 6, 1, 1), {"stride": 2, "bias": False}),
    ("many_channels", (1, 19, 3, 4, 11, 3, 3), {"padding": 1}),
]
IDS = [c[0] for c in CASES]


def _case(shape, kwargs, dtype, seed=0):
    n, c, h, w, k, r, s = shape
    kwargs = dict(kwargs)
    use_bias = kwargs.pop("bias", True)
    rng = np.random.default_rng(seed)
    x, wt, b = make_problem(rng, n, c, h, w, k, r, s, groups=kwargs.get("groups", 1), dtype=dtype, bias=use_bias)
    expected = torch_conv2d(x, wt, b, **kwargs)
    return x, wt, b, kwargs, expected, (c // kwargs.get("groups", 1)) * r * s


def _check(kernel, layout, dtype, shape, kwargs, weight_layout=None):
    x, wt, b, kwargs, expected, red = _case(shape, kwargs, dtype)
    weight_layout = weight_layout or ("OIHW" if layout == "NCHW" else "HWIO")
    got = cuda_conv.conv2d_cuda(to_act(x, layout), to_weight(wt, weight_layout), b, layout=layout,
                                weight_layout=weight_layout, kernel=kernel, **kwargs)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.flags.c_contiguous
    assert_close(got, to_act(expected, layout), dtype, red)


@needs_cuda
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("kernel", ["direct", "gemm8"])
@pytest.mark.parametrize("name,shape,kwargs", CASES, ids=IDS)
def test_geometry_float32(kernel, layout, name, shape, kwargs):
    _check(kernel, layout, np.float32, shape, kwargs)


@needs_cuda
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("kernel", ["direct", "gemm8"])
@pytest.mark.parametrize("name", ["basic", "dilation_pair_stride", "reflect", "circular_same_stride2",
                                  "groups3_stride", "depthwise_multiplier2"])
def test_geometry_float64(kernel, layout, name):
    _, shape, kwargs = CASES[IDS.index(name)]
    _check(kernel, layout, np.float64, shape, kwargs)


@needs_cuda
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel", ["gemm64", "gemm128", "auto", "gemm"])
def test_production_tiles(kernel, layout, dtype):
    """The tiles a GPU runs (256 threads a block), across a reduction longer than one slice."""
    _check(kernel, layout, dtype, (1, 9, 5, 6, 7, 3, 3), {"padding": 1, "stride": (1, 2)})


@needs_cuda
@pytest.mark.parametrize("layout,weight_layout", [("NCHW", "HWIO"), ("NCHW", "OHWI"), ("NHWC", "OIHW"),
                                                  ("NHWC", "OHWI")])
@pytest.mark.parametrize("kernel", ["direct", "gemm8"])
def test_weight_layouts(kernel, layout, weight_layout):
    _check(kernel, layout, np.float32, (1, 4, 5, 5, 6, 3, 2), {"padding": 1, "groups": 2}, weight_layout)


@needs_cuda
def test_auto_picks_direct_for_depthwise_and_gemm_otherwise():
    from numbaconv.problem import ConvProblem

    def problem(c, k, groups, dtype=np.float32, n=32, hw=56):
        return ConvProblem(n=n, c=c, h=hw, w=hw, k=k, r=3, s=3, pad_top=1, pad_bottom=1, pad_left=1,
                           pad_right=1, groups=groups, dtype=np.dtype(dtype))

    assert cuda_conv.choose_kernel(problem(64, 64, 64)) == "direct"
    assert cuda_conv.choose_kernel(problem(64, 64, 1)) == "gemm64"
    assert cuda_conv.choose_kernel(problem(256, 256, 1, hw=28)) == "gemm128"
    assert cuda_conv.choose_kernel(problem(256, 256, 1, hw=14)) == "gemm64"  # < 2 waves of 128-tiles
    assert cuda_conv.choose_kernel(problem(512, 512, 1, n=1, hw=7)) == "gemm64"  # too few 128-tiles
    assert cuda_conv.choose_kernel(problem(256, 256, 1, np.float64, hw=14)) == "gemm64"


def test_index_map_matches_the_host_padding():
    """``_src_py`` (the map the kernels inline) agrees with the CPU padding's ``source_index``."""
    from numbaconv.padding import _MODE_CODE as HOST_CODE
    from numbaconv.padding import source_index

    for mode, code in cuda_conv._MODE_CODE.items():
        for size in (1, 2, 5):
            pad = size - 1 if mode == "reflect" else size
            for i in range(-pad, size + pad):
                got = cuda_conv._src_py(i, size, code)
                if mode == "zeros":
                    assert got == (i if 0 <= i < size else -1)
                else:
                    assert got == source_index.py_func(i, size, HOST_CODE[mode]), (mode, size, i)


# --- the front door --------------------------------------------------------------------
@needs_cuda
def test_listed_and_routed_through_conv2d():
    assert "cuda" in numbaconv.algorithms()
    x, wt, b, kwargs, expected, red = _case((2, 3, 6, 5, 4, 3, 3), {"padding": "same", "stride": 2}, np.float32)
    got = numbaconv.conv2d(x, wt, b, algorithm="cuda", **kwargs)
    assert isinstance(got, np.ndarray)
    assert_close(got, expected, np.float32, red)


@needs_cuda
def test_numpy_out_and_inputs_untouched():
    x, wt, b, kwargs, expected, red = _case((1, 3, 5, 5, 4, 3, 3), {"padding": 1}, np.float64)
    copies = [a.copy() for a in (x, wt, b)]
    out = np.full(expected.shape, np.nan)
    got = numbaconv.conv2d(x, wt, b, padding=1, algorithm="cuda", out=out)
    assert got is out
    assert_close(out, expected, np.float64, red)
    for a, c in zip((x, wt, b), copies):
        np.testing.assert_array_equal(a, c)


@needs_cuda
def test_strided_numpy_input():
    x, wt, b, kwargs, expected, red = _case((1, 3, 6, 10, 4, 3, 3), {"padding": 1}, np.float32)
    xs = np.asfortranarray(x)[:, :, ::-1, ::2]
    expected = torch_conv2d(np.ascontiguousarray(xs), wt, b, padding=1)
    assert_close(numbaconv.conv2d(xs, wt, b, padding=1, algorithm="cuda"), expected, np.float32, red)


@needs_cuda
def test_batch0():
    x = np.zeros((0, 3, 5, 5), np.float32)
    w = np.ones((2, 3, 3, 3), np.float32)
    got = numbaconv.conv2d(x, w, padding=1, algorithm="cuda")
    assert got.shape == (0, 2, 5, 5)
    got = cuda_conv.conv2d_cuda(cuda.to_device(x), cuda.to_device(w), padding=1)
    assert got.shape == (0, 2, 5, 5) and not isinstance(got, np.ndarray)


@needs_cuda
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the simulator computes in NumPy
def test_nan_and_inf_propagate():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 1] = np.nan
    x[0, 0, 3, 3] = np.inf
    w = np.ones((1, 1, 2, 2), np.float32)
    for kernel in ("direct", "gemm8"):
        got = cuda_conv.conv2d_cuda(x, w, kernel=kernel)
        expected = torch_conv2d(x, w)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))


@needs_cuda
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # the simulator's exp in NumPy
def test_epilogue_numpy_and_device():
    """activation / residual through the GPU's epilogue kernel: NumPy residual, device
    residual (a strided view), out=residual in place on the device, and through a plan."""
    import torch.nn.functional as F  # noqa: PLC0415
    import torch  # noqa: PLC0415
    x, wt, b, kwargs, expected, red = _case((1, 3, 5, 5, 4, 3, 3), {"padding": 1}, np.float32)
    res = np.random.default_rng(5).standard_normal(expected.shape).astype(np.float32)
    for activation, fn in (("relu", F.relu), ("relu6", F.relu6), ("silu", F.silu), ("hardswish", F.hardswish)):
        want = fn(torch.from_numpy(expected + res)).numpy()
        got = numbaconv.conv2d(x, wt, b, algorithm="cuda", activation=activation, residual=res, **kwargs)
        assert_close(got, want, np.float32, red)
    want = F.relu(torch.from_numpy(expected + res)).numpy()
    wide = cuda.to_device(np.repeat(res, 2, axis=3))  # a residual with a column stride of 2
    got = cuda_conv.conv2d_cuda(cuda.to_device(x), cuda.to_device(wt), cuda.to_device(b), activation="relu",
                                residual=wide[:, :, :, ::2], **kwargs)
    assert_close(got.copy_to_host(), want, np.float32, red)
    out = cuda.to_device(res)
    assert numbaconv.conv2d(cuda.to_device(x), wt, b, algorithm="cuda", activation="relu", residual=out, out=out,
                            **kwargs) is out
    assert_close(out.copy_to_host(), want, np.float32, red)
    plan = numbaconv.Conv2dPlan(wt, b, algorithm="cuda", activation="relu", **kwargs)
    assert_close(plan(x, residual=res), want, np.float32, red)
    with pytest.raises(ValueError, match="residual has shape"):
        numbaconv.conv2d(x, wt, b, algorithm="cuda", residual=res[:, :, 1:], **kwargs)
    with pytest.raises(ValueError, match="activation must be"):
        numbaconv.conv2d(x, wt, b, algorithm="cuda", activation="elu", **kwargs)


# --- device arrays ---------------------------------------------------------------------
@needs_cuda
@pytest.mark.parametrize("kernel", ["direct", "gemm8"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_device_arrays_in_device_array_out(kernel, layout):
    x, wt, b, kwargs, expected, red = _case((2, 4, 5, 6, 6, 3, 3),
                                            {"padding": 1, "padding_mode": "reflect", "groups": 2}, np.float32)
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    xd, wd, bd = cuda.to_device(to_act(x, layout)), cuda.to_device(to_weight(wt, wl)), cuda.to_device(b)
    got = cuda_conv.conv2d_cuda(xd, wd, bd, layout=layout, kernel=kernel, **kwargs)
    assert not isinstance(got, np.ndarray) and cuda_conv.is_device_array(got)
    assert got.shape == to_act(expected, layout).shape and got.dtype == np.float32
    assert_close(got.copy_to_host(), to_act(expected, layout), np.float32, red)
    np.testing.assert_array_equal(xd.copy_to_host(), to_act(x, layout))  # input untouched


@needs_cuda
def test_auto_routes_device_arrays_to_cuda():
    x, wt, b, kwargs, expected, red = _case((1, 3, 5, 5, 4, 3, 3), {"padding": 1}, np.float32)
    got = numbaconv.conv2d(cuda.to_device(x), cuda.to_device(wt), cuda.to_device(b), **kwargs)  # algorithm="auto"
    assert cuda_conv.is_device_array(got)
    assert_close(got.copy_to_host(), expected, np.float32, red)


@needs_cuda
def test_device_out_and_mixed_inputs():
    x, wt, b, kwargs, expected, red = _case((1, 3, 5, 5, 4, 3, 3), {"stride": 2, "padding": 1}, np.float64)
    out = cuda.device_array(expected.shape, dtype=np.float64)
    got = numbaconv.conv2d(cuda.to_device(x), wt, b, algorithm="cuda", out=out, **kwargs)  # weights from host
    assert got is out
    assert_close(out.copy_to_host(), expected, np.float64, red)
    host_out = np.empty(expected.shape)  # device input, host out: result lands in host_out
    got = numbaconv.conv2d(cuda.to_device(x), cuda.to_device(wt), b, algorithm="cuda", out=host_out, **kwargs)
    assert got is host_out
    assert_close(host_out, expected, np.float64, red)


@needs_cuda
def test_strided_device_views():
    """Non-contiguous device views are read in place (the kernels index with strides)."""
    x, wt, b, kwargs, expected, red = _case((1, 3, 6, 10, 4, 3, 3), {"padding": 1}, np.float32)
    xd = cuda.to_device(x)[:, :, :, ::2]
    wd = cuda.to_device(np.ascontiguousarray(np.transpose(wt, (2, 3, 1, 0))))  # HWIO storage
    wd = wd.transpose((3, 2, 0, 1))  # an OIHW view of it
    expected = torch_conv2d(np.ascontiguousarray(x[:, :, :, ::2]), wt, b, padding=1)
    for kernel in ("direct", "gemm8"):
        got = cuda_conv.conv2d_cuda(xd, wd, cuda.to_device(b), padding=1, kernel=kernel)
        assert_close(got.copy_to_host(), expected, np.float32, red)


@needs_cuda
def test_device_errors_name_the_argument():
    x = cuda.to_device(np.zeros((1, 3, 5, 5), np.float32))
    w = cuda.to_device(np.zeros((2, 3, 3, 3), np.float32))
    with pytest.raises(TypeError, match="weight has dtype float64"):
        numbaconv.conv2d(x, cuda.to_device(np.zeros((2, 3, 3, 3))), algorithm="cuda")
    with pytest.raises(ValueError, match="groups=2 must divide"):
        numbaconv.conv2d(x, w, groups=2, algorithm="cuda")
    with pytest.raises(ValueError, match="out has shape"):
        numbaconv.conv2d(x, w, algorithm="cuda", out=cuda.device_array((1, 2, 5, 5), np.float32))
    with pytest.raises(TypeError, match="out has dtype"):
        numbaconv.conv2d(x, w, algorithm="cuda", out=cuda.device_array((1, 2, 3, 3), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        numbaconv.conv2d(x, w, algorithm="cuda", out=cuda.device_array((1, 2, 3, 6), np.float32)[:, :, :, ::2])
    with pytest.raises(ValueError, match="share memory with x"):
        big = cuda.to_device(np.zeros((1, 3, 5, 5), np.float32))
        numbaconv.conv2d(big, w[:1], algorithm="cuda", out=big.reshape(75)[:9].reshape((1, 1, 3, 3)))
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        numbaconv.conv2d([[1.0]], w, algorithm="cuda")
    with pytest.raises(TypeError, match="out must be None"):
        numbaconv.conv2d(x, w, algorithm="cuda", out=[1.0])
    with pytest.raises(ValueError, match="kernel must be one of"):
        cuda_conv.conv2d_cuda(x, w, kernel="fast")


# --- availability ----------------------------------------------------------------------
@pytest.mark.skipif(USABLE or not HAVE_NUMBA_CUDA, reason="the CUDA tests run")
def test_cuda_tests_are_not_locked_out():
    """Not a skip but a failure: numba-cuda is installed, yet something imported numba.cuda in
    hardware mode before this module (on a machine with no GPU), so the simulator cannot start.
    Check for a GPU with ``numbaconv.cuda.conv.real_gpu()`` / ``available()`` instead: they
    never import numba.cuda without a CUDA driver."""
    pytest.fail(REASON + ": some module imported numba.cuda early; use cuda_conv.real_gpu() instead")



def _python(code, **env):
    environ = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(not SIM, reason="a real GPU is present")
def test_not_listed_without_gpu_or_simulator_and_numba_cuda_not_imported():
    code = ("import sys, numbaconv; print('cuda' in numbaconv.algorithms(), 'numba.cuda' in sys.modules, "
            "'torch' in sys.modules)")
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False", "False"]
    res = _python(code, NUMBA_ENABLE_CUDASIM="1")
    assert res.stdout.split() == ["True", "True", "False"], res.stderr


def test_not_listed_without_numba_cuda():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'numba_cuda' or name.startswith('numba_cuda.'):\n"
            "            raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import numbaconv; print('cuda' in numbaconv.algorithms())\n")
    res = _python(code, NUMBA_ENABLE_CUDASIM="1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False"]


# --- backward kernels (numbaconv.cuda.backward) -------------------------------------------
BACKWARD_CASES = ["basic", "stride_pair", "dilation_pair_stride", "asymmetric_padding", "replicate",
                  "circular_same_stride2", "depthwise_multiplier2", "no_bias_pointwise_stride2"]


def _check_backward(name, layout, dtype, weight_layout=None, block=4):
    from numbaconv.cuda import backward as cuda_backward

    _, shape, kwargs = CASES[IDS.index(name)]
    kwargs = {k: v for k, v in kwargs.items() if k != "bias"}
    x, wt, b, kwargs, expected, red = _case(shape, kwargs, dtype)
    b = np.zeros(wt.shape[0], dtype) if b is None else b
    gy = np.random.default_rng(1).standard_normal(expected.shape).astype(dtype)
    dx, dw, db = torch_grads(x, wt, b, gy, **kwargs)
    wl = weight_layout or ("OIHW" if layout == "NCHW" else "HWIO")
    gx, gw, gb = cuda_backward.conv2d_backward_cuda(to_act(gy, layout), to_act(x, layout), to_weight(wt, wl),
                                                    layout=layout, weight_layout=wl, block=block, **kwargs)
    assert all(isinstance(g, np.ndarray) and g.dtype == dtype for g in (gx, gw, gb))
    n, k, ho, wo = gy.shape
    assert_close(gx, to_act(dx, layout), dtype, k * shape[5] * shape[6])
    assert_close(gw, to_weight(dw, wl), dtype, n * ho * wo)
    assert_close(gb, db, dtype, n * ho * wo)


@needs_cuda
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", BACKWARD_CASES)
def test_backward_kernels_float32(name, layout):
    _check_backward(name, layout, np.float32)


@needs_cuda
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", ["reflect", "groups3_stride"])
def test_backward_kernels_float64_and_weight_layouts(name, layout):
    _check_backward(name, layout, np.float64, weight_layout="OHWI", block=8)


@needs_cuda
def test_backward_device_arrays_partial_and_errors():
    from numbaconv.cuda import backward as cuda_backward

    x, wt, b, kwargs, expected, red = _case((1, 3, 5, 5, 4, 3, 3), {"padding": 1, "stride": 2}, np.float32)
    gy = np.random.default_rng(2).standard_normal(expected.shape).astype(np.float32)
    dx, dw, db = torch_grads(x, wt, b, gy, **kwargs)
    xd, wd, gd = cuda.to_device(x), cuda.to_device(wt), cuda.to_device(gy)
    gx, gw, gb = cuda_backward.conv2d_backward_cuda(gd, xd, wd, need=(True, False, True), block=4, **kwargs)
    assert gw is None and cuda_conv.is_device_array(gx) and cuda_conv.is_device_array(gb)
    assert_close(gx.copy_to_host(), dx, np.float32, 36)
    assert_close(gb.copy_to_host(), db, np.float32, 9)
    np.testing.assert_array_equal(xd.copy_to_host(), x)  # inputs untouched
    np.testing.assert_array_equal(gd.copy_to_host(), gy)
    with pytest.raises(ValueError, match="grad_output has shape"):
        cuda_backward.conv2d_backward_cuda(gd, xd, wd, padding=1)
    with pytest.raises(TypeError, match="grad_output has dtype float64"):
        cuda_backward.conv2d_backward_cuda(gy.astype(np.float64), x, wt, **kwargs)
    with pytest.raises(ValueError, match="block must be a power of two"):
        cuda_backward.conv2d_backward_cuda(gy, x, wt, block=6, **kwargs)


@needs_cuda
def test_conv2d_backward_routes_device_arrays_to_cuda():
    """``numbaconv.conv2d_backward`` on device arrays runs the CUDA kernels (device arrays out)."""
    x, wt, b, kwargs, expected, red = _case((1, 3, 5, 6, 4, 3, 3), {"padding": 1, "padding_mode": "reflect"},
                                            np.float32)
    gy = np.random.default_rng(4).standard_normal(expected.shape).astype(np.float32)
    dx, dw, db = torch_grads(x, wt, b, gy, **kwargs)
    gx, gw, gb = numbaconv.conv2d_backward(cuda.to_device(gy), cuda.to_device(x), cuda.to_device(wt), **kwargs)
    assert all(cuda_conv.is_device_array(g) for g in (gx, gw, gb))
    assert_close(gx.copy_to_host(), dx, np.float32, 36)
    assert_close(gw.copy_to_host(), dw, np.float32, 30)
    assert_close(gb.copy_to_host(), db, np.float32, 30)
    gx, gw, gb = numbaconv.conv2d_backward(cuda.to_device(gy), cuda.to_device(x), cuda.to_device(wt),
                                           weight_grad=False, bias_grad=False, **kwargs)
    assert gw is None and gb is None and cuda_conv.is_device_array(gx)


# --- PTX: real compilation for sm_90, in a process without the simulator ----------------
@pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason=REASON)
def test_ptx_sm90():
    res = _python("import runpy, sys; sys.argv = ['check_ptx']; runpy.run_path('scripts/check_ptx.py', run_name='__main__')")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all kernels compiled" in res.stdout


# --- torch CUDA tensors (a real GPU only: NUMBA_ENABLE_CUDASIM=0 pytest tests/test_cuda.py) ---
def _torch_cuda():
    if SIM:
        return None
    import torch

    return torch if torch.cuda.is_available() else None


needs_torch_cuda = pytest.mark.skipif(SIM or not USABLE, reason="needs a GPU and torch with CUDA (not the simulator)")


@needs_torch_cuda
@pytest.mark.parametrize("kernel", ["auto", "direct", "gemm64", "gemm128"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", ["basic", "same_stride2", "reflect", "groups3_stride", "depthwise", "many_channels"])
def test_torch_cuda_tensors(name, layout, kernel):
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("torch has no CUDA here")
    _, shape, kwargs = CASES[IDS.index(name)]
    x, wt, b, kwargs, expected, red = _case(shape, kwargs, np.float32)
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    xt = torch.from_numpy(to_act(x, layout)).cuda()
    wt_t = torch.from_numpy(to_weight(wt, wl)).cuda()
    bt = None if b is None else torch.from_numpy(b).cuda()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # must run on torch's current stream, not numba's default
        got = cuda_conv.conv2d_cuda(xt, wt_t, bt, layout=layout, kernel=kernel, **kwargs)
    stream.synchronize()
    assert isinstance(got, torch.Tensor) and got.is_cuda and got.device == xt.device
    assert_close(got.cpu().numpy(), to_act(expected, layout), np.float32, red)


@needs_torch_cuda
def test_torch_channels_last_views_and_requires_grad():
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("torch has no CUDA here")
    x, wt, b, kwargs, expected, red = _case((2, 8, 9, 9, 16, 3, 3), {"padding": 1}, np.float32)
    xt = torch.from_numpy(x).cuda().to(memory_format=torch.channels_last).requires_grad_()
    wt_t = torch.from_numpy(wt).cuda().to(memory_format=torch.channels_last)
    # NHWC / HWIO views of channels-last memory: no copies
    got = numbaconv.conv2d(xt.permute(0, 2, 3, 1), wt_t.permute(2, 3, 1, 0), torch.from_numpy(b).cuda(),
                           padding=1, layout="NHWC", algorithm="cuda")
    torch.cuda.synchronize()
    assert_close(got.permute(0, 3, 1, 2).cpu().numpy(), expected, np.float32, red)
    # NCHW view of channels-last memory: strided reads in place; "auto" routes device arrays to cuda
    got = numbaconv.conv2d(xt.detach(), wt_t, None, padding=1)
    torch.cuda.synchronize()
    expected_nb = torch_conv2d(x, wt, None, padding=1)
    assert_close(got.cpu().numpy(), expected_nb, np.float32, red)


@needs_torch_cuda
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_torch_conv2d_module_backward_on_cuda(padding_mode):
    """numbaconv.torch.Conv2d on CUDA tensors: forward and backward through numbaconv's CUDA
    kernels match torch.nn.Conv2d's gradients."""
    torch = _torch_cuda()
    if torch is None:
        pytest.skip("torch has no CUDA here")
    from numbaconv.torch import Conv2d

    torch.manual_seed(0)
    ref = torch.nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode).double().cuda()
    ours = Conv2d(6, 8, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode).double().cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 9, 10, dtype=torch.float64, device="cuda")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xa).square().sum().backward()
    ours(xb).square().sum().backward()
    torch.cuda.synchronize()
    for a, b in ((xa.grad, xb.grad), (ref.weight.grad, ours.weight.grad), (ref.bias.grad, ours.bias.grad)):
        np.testing.assert_allclose(b.cpu().numpy(), a.cpu().numpy(), rtol=1e-10, atol=1e-10)
