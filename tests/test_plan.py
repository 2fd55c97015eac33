"""``numbaconv.Conv2dPlan``: equals ``conv2d`` for any batch and image size, keeps its own
weights, prepares them once, is safe across threads, and raises ``conv2d``'s errors."""

import threading

import numpy as np
import pytest

import numbaconv
from numbaconv.cpu import _wcache, tiled, winograd
from numbaconv.registry import REGISTRY
from reference import make_problem, to_act, to_weight, tolerance, torch_conv2d

HOST = [name for name in numbaconv.algorithms() if REGISTRY[name].host]

# (id, C K R S, kwargs)
LAYERS = [
    ("3x3", (16, 32, 3, 3), {"padding": 1}),
    ("strided", (8, 24, 3, 3), {"stride": 2, "padding": "same"}),
    ("depthwise", (16, 16, 3, 3), {"groups": 16, "padding": 1}),
    ("pointwise", (16, 8, 1, 1), {}),
    ("reflect", (4, 8, 3, 3), {"padding": 1, "padding_mode": "reflect"}),
    ("far_padding", (4, 6, 3, 3), {"padding": 7}),
]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("algorithm", ["auto"] + HOST)
@pytest.mark.parametrize("name,shape,kwargs", LAYERS, ids=[layer[0] for layer in LAYERS])
def test_equals_conv2d_for_any_batch_and_image_size(name, shape, kwargs, algorithm, layout):
    c, k, r, s = shape
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64):
        _, wt, b = make_problem(rng, 1, c, 1, 1, k, r, s, groups=kwargs.get("groups", 1), dtype=dtype)
        wl = "OIHW" if layout == "NCHW" else "OHWI"  # OHWI: a layout the kernels never take
        plan = numbaconv.Conv2dPlan(to_weight(wt, wl), b, layout=layout, weight_layout=wl, algorithm=algorithm,
                                    activation="relu", **kwargs)
        # (1x1 images: fewer pixels than threads, the squeeze-excitation layers' shape)
        tiny = () if kwargs.get("padding_mode") == "reflect" else ((3, 1, 1), (1, 1, 1))
        for n, h, w in ((1, 9, 8), (3, 12, 13), (1, 9, 8), (2, 5, 6)) + tiny:
            x = rng.standard_normal((n, c, h, w)).astype(dtype)
            want = np.maximum(torch_conv2d(x, wt, b, **kwargs), 0)
            got = plan(to_act(x, layout))
            np.testing.assert_allclose(got, to_act(want, layout), rtol=0,
                                       atol=tolerance(dtype, c // kwargs.get("groups", 1) * r * s))
            res = rng.standard_normal(got.shape).astype(dtype)
            out = np.empty_like(got)
            assert plan(to_act(x, layout), residual=res, out=out) is out
            np.testing.assert_allclose(out, np.maximum(to_act(torch_conv2d(x, wt, b, **kwargs), layout) + res, 0),
                                       rtol=0, atol=tolerance(dtype, c * r * s))


def test_keeps_its_own_weights():
    rng = np.random.default_rng(1)
    x, wt, b = make_problem(rng, 1, 16, 10, 10, 32, 3, 3)
    plan = numbaconv.Conv2dPlan(wt, b, padding=1)
    first = plan(x)
    wt[...] = 0  # the caller's arrays change; the plan's copy does not
    b[...] = 7
    np.testing.assert_array_equal(plan(x), first)


@pytest.mark.parametrize("algorithm,builder", [("tiled", "_pack_weights"), ("winograd", "_transform_weights")])
def test_prepares_its_weights_once_and_never_compares_them(algorithm, builder, monkeypatch):
    """The packed / transformed weights are made on the first call and reused after; the
    weight caches' bit-for-bit comparison (for callers' arrays) never runs for a plan."""
    module = tiled if algorithm == "tiled" else winograd
    builds, checks = [], []
    real_build, real_check = getattr(module, builder), _wcache._bits_differ
    monkeypatch.setattr(module, builder, lambda *a: builds.append(1) or real_build(*a))
    monkeypatch.setattr(_wcache, "_bits_differ", lambda *a: checks.append(1) or real_check(*a))
    rng = np.random.default_rng(2)
    x, wt, b = make_problem(rng, 1, 64, 12, 12, 64, 3, 3)  # 147 KB: tiled caches weights from 64 KiB
    plan = numbaconv.Conv2dPlan(wt, b, padding=1, algorithm=algorithm)
    results = [plan(x) for _ in range(3)] + [plan(x[:, :, :10, :11])]
    assert len(builds) == 1 and checks == []
    np.testing.assert_array_equal(results[0], results[2])
    # conv2d with the same weights checks them on every call (the plan's saving)
    numbaconv.conv2d(x, wt, b, padding=1, algorithm=algorithm)
    numbaconv.conv2d(x, wt, b, padding=1, algorithm=algorithm)
    assert checks


def test_safe_from_several_threads():
    rng = np.random.default_rng(3)
    _, wt, b = make_problem(rng, 1, 16, 1, 1, 16, 3, 3)
    plan = numbaconv.Conv2dPlan(wt, b, padding=1, activation="silu")
    inputs = [rng.standard_normal((1 + i % 2, 16, 8 + i, 9)).astype(np.float32) for i in range(8)]
    want = [numbaconv.conv2d(x, wt, b, padding=1, activation="silu") for x in inputs]
    got = [None] * len(inputs)
    errors = []

    def work(i):
        try:
            for _ in range(5):
                got[i] = plan(inputs[i])
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5)


def test_unbatched_batch0_and_nonfinite_weights():
    rng = np.random.default_rng(4)
    x, wt, b = make_problem(rng, 1, 4, 6, 6, 8, 3, 3, dtype=np.float64)
    plan = numbaconv.Conv2dPlan(wt, b, padding=1)
    np.testing.assert_allclose(plan(x[0]), torch_conv2d(x, wt, b, padding=1)[0], rtol=0, atol=1e-12)
    assert plan(np.zeros((0, 4, 6, 6))).shape == (0, 8, 6, 6)
    wt[0, 0, 0, 0] = np.inf  # zero padding times inf is NaN in torch: the plan follows conv2d
    plan = numbaconv.Conv2dPlan(wt, b, padding=1)
    np.testing.assert_array_equal(np.isnan(plan(x)), np.isnan(torch_conv2d(x, wt, b, padding=1)))


def _message(fn):
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e), str(e)
    raise AssertionError("no error")


def test_errors_are_conv2d_errors():
    w = np.zeros((8, 4, 3, 3), np.float32)
    plan = numbaconv.Conv2dPlan(w, padding=1)
    for bad_x in (np.zeros((1, 5, 6, 6), np.float32), np.zeros((1, 4, 6, 6)), [[1.0]], np.zeros((4, 6), np.float32),
                  np.zeros((1, 4, 0, 6), np.float32)):
        assert _message(lambda: plan(bad_x)) == _message(lambda: numbaconv.conv2d(bad_x, w, padding=1))
    x = np.zeros((1, 4, 6, 6), np.float32)
    for kw in ({"out": np.zeros((1, 8, 6, 5), np.float32)}, {"out": np.zeros((1, 8, 6, 6))},
               {"residual": np.zeros((1, 8, 6, 6))}, {"residual": np.zeros((1, 8, 5, 6), np.float32)},
               {"out": x}):
        assert _message(lambda: plan(x, **kw)) == _message(lambda: numbaconv.conv2d(x, w, padding=1, **kw))
    with pytest.raises(TypeError, match="weight must be a numpy.ndarray, got list"):
        numbaconv.Conv2dPlan([[1.0]])
    with pytest.raises(ValueError, match="activation must be"):
        numbaconv.Conv2dPlan(w, activation="tanh")
    with pytest.raises(ValueError, match="algorithm must be 'auto' or one of"):
        numbaconv.Conv2dPlan(w, algorithm="fft")
    with pytest.raises(ValueError, match="groups=3 must divide"):
        numbaconv.Conv2dPlan(w, groups=3)
    with pytest.raises(ValueError, match="bias must have shape"):
        numbaconv.Conv2dPlan(w, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="padding must be"):
        numbaconv.Conv2dPlan(w, padding=-1)
    with pytest.raises(ValueError, match="weight_layout must be"):
        numbaconv.Conv2dPlan(w, weight_layout="XYZW")


@pytest.mark.parametrize("groups", [1, 2])
def test_nhwc_pointwise_chunks(groups, monkeypatch):
    """im2col's NHWC 1x1 path in chunks of pixels, each finished (bias, residual, activation)
    while cached: chunk boundaries inside each thread's range and a partial last chunk."""
    from numbaconv.cpu import im2col

    monkeypatch.setattr(im2col, "NHWC_CHUNK_MIN_THREAD_BYTES", 0)
    monkeypatch.setattr(im2col, "NHWC_CHUNK_BYTES", 1)  # the 64-pixel floor
    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        _, wt, b = make_problem(rng, 1, 8, 1, 1, 12, 1, 1, groups=groups, dtype=dtype)
        plan = numbaconv.Conv2dPlan(to_weight(wt, "HWIO"), b, layout="NHWC", weight_layout="HWIO",
                                    algorithm="im2col", activation="silu", groups=groups)
        x = rng.standard_normal((3, 7, 9, 8)).astype(dtype)  # 189 pixels: 95 + 94 a thread
        res = rng.standard_normal((3, 7, 9, 12)).astype(dtype)
        want = torch_conv2d(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), wt, b, groups=groups)
        want = to_act(want, "NHWC") + res
        want = want / (1 + np.exp(-want))
        np.testing.assert_allclose(plan(x, residual=res), want, rtol=0, atol=tolerance(dtype, 8 // groups) * 4)


@pytest.mark.parametrize("n", [1, 1000, _wcache.SERIAL_ELEMENTS, _wcache.SERIAL_ELEMENTS + 1, 3 * _wcache.SERIAL_ELEMENTS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_weight_caches_bit_check(n, dtype):
    """conv2d's cached weights are reused only for bit-identical weights: the check (libc's
    memcmp up to SERIAL_ELEMENTS, compiled chunks in parallel beyond) sees a change of one
    bit anywhere, -0.0 against 0.0 and a NaN's payload included."""
    rng = np.random.default_rng(n)
    a = rng.standard_normal(n).astype(dtype)
    bits = _wcache._as_bits
    assert not _wcache._bits_differ(bits(a), bits(a.copy()))
    for i in {0, n // 2, n - 1}:
        for change in ("ulp", "sign", "nan"):
            b = a.copy()
            if change == "ulp":
                b[i] = np.nextafter(b[i], np.inf)
            elif change == "sign":
                a0 = a.copy()
                a0[i], b[i] = 0.0, -0.0
                assert _wcache._bits_differ(bits(a0), bits(b)), (i, change)
                continue
            else:
                a0, b = a.copy(), a.copy()
                a0[i] = np.nan
                b[i] = -np.nan
                assert _wcache._bits_differ(bits(a0), bits(b)), (i, change)
                continue
            assert _wcache._bits_differ(bits(a), bits(b)), (i, change)
