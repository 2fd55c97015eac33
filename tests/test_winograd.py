"""The ``winograd`` algorithm against torch float64, plus what is particular to it: the
transform matrices, SPEC's elementwise error bound on hard inputs, NaN/Inf propagation
through whole tiles, edge tiles, and its transformed-weight cache.

(Its conformance across every argument form runs in the shared suites, which iterate over
the registry: ``test_conv2d.py``, ``test_properties.py``, ``test_edge_cases.py``.)
"""

from fractions import Fraction

import numpy as np
import pytest

import numbaconv
from numbaconv.cpu import tiled, winograd
from numbaconv.problem import ConvProblem
from reference import assert_close, make_problem, to_act, to_weight, torch_conv2d

LAYOUTS = ["NCHW", "NHWC"]
DTYPES = [np.float32, np.float64]
#: SPEC.md: |y - y_exact| <= BOUND * conv(|x|, |w|) elementwise
BOUND = {np.float32: 1e-4, np.float64: 1e-11}


@pytest.mark.parametrize("m", [2, 4])
def test_matrices_compute_the_correlation_exactly(m):
    """``A^T [(G g G^T) . (B^T d B)] A`` equals the 3x3 correlation of the tile, in exact
    rational arithmetic (so only float rounding separates the kernels from the direct sum)."""
    rng = np.random.default_rng(m)
    d = rng.integers(-9, 10, (m + 2, m + 2))
    g = rng.integers(-9, 10, (3, 3))
    y = winograd.reference(d, g, m)
    for i in range(m):
        for j in range(m):
            assert y[i][j] == sum(Fraction(int(d[i + r, j + s] * g[r, s])) for r in range(3) for s in range(3))


def _run(x, w, b, layout, m=None, **kw):
    xa = to_act(x, layout)
    wa = w if layout == "NCHW" else to_weight(w, "HWIO")
    p = ConvProblem.from_args(xa, wa, b, layout=layout, **kw)
    out = np.empty(p.out_shape, x.dtype)
    winograd.run(p, xa, wa, b, out, m)
    return out


# (n, c, h, w, k, groups, padding): edge tiles in both directions, K not a multiple of V,
# channel blocks, groups, batch, tiny images
CASES = [
    (1, 16, 9, 11, 40, 1, 1),
    (2, 24, 8, 8, 33, 1, 0),
    (1, 20, 5, 7, 64, 2, 1),
    (3, 16, 3, 3, 16, 1, 0),
    (1, 300, 6, 13, 20, 1, ((2, 0), (1, 2))),
    (2, 64, 14, 14, 48, 4, 1),
]


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_both_tile_sizes_match_torch(case, dtype, layout, m):
    n, c, h, w, k, groups, padding = case
    rng = np.random.default_rng(sum(case[:5]))
    x, wt, b = make_problem(rng, n, c, h, w, k, 3, 3, groups=groups, dtype=dtype)
    got = _run(x, wt, b, layout, m, padding=padding, groups=groups)
    assert_close(got, to_act(torch_conv2d(x, wt, b, padding=padding, groups=groups), layout), dtype,
                 (c // groups) * 9)


def test_plan_picks_small_tiles_for_small_outputs():
    def prob(n, hw):
        return ConvProblem(n=n, c=512, h=hw, w=hw, k=512, r=3, s=3, stride_h=1, stride_w=1, pad_top=1,
                           pad_bottom=1, pad_left=1, pad_right=1, groups=1, layout="NCHW", weight_layout="OIHW",
                           dtype=np.dtype(np.float32))
    assert winograd.tile_size(prob(1, 7)) == 2  # res5: four 4x4 tiles would only stream weights
    assert winograd.tile_size(prob(1, 56)) == 4
    assert winograd.tile_size(prob(8, 7)) == 4


def test_plan_takes_the_wide_gemm_block_only_with_two_blocks_of_tiles():
    """Images with at least two of tiled's largest blocks of tiles run their GEMMs in those
    blocks (14 tiles on AVX-512), others in the GEMM blocks (8): res5's 16 tiles would fill
    28 slots.  The last case of ``CASES`` runs both in test_both_tile_sizes_match_torch."""
    def prob(n, c, hw, groups=1):
        return ConvProblem(n=n, c=c, h=hw, w=hw, k=c, r=3, s=3, pad_top=1, pad_bottom=1, pad_left=1,
                           pad_right=1, groups=groups, dtype=np.dtype(np.float32))
    wide, narrow = winograd._P_WIDE, winograd._P
    assert winograd.plan(prob(1, 512, 7))["P"] == narrow
    assert winograd.plan(prob(1, 256, 14))["P"] == narrow  # (16 tiles of 4x4)
    assert winograd.plan(prob(1, 256, 28, 8))["P"] == wide
    assert winograd.plan(prob(2, 64, 14, 4), 2)["P"] == wide and winograd.plan(prob(2, 64, 14, 4), 4)["P"] == narrow
    b = winograd.plan(prob(8, 128, 28))
    assert b["T"] % b["P"] == 0


def _conv_abs(x, w, padding):
    return torch_conv2d(np.abs(x), np.abs(w), None, padding=padding)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_spec_error_bound_on_a_large_dynamic_range(dtype, layout):
    """SPEC's bound, elementwise, on a deep reduction (C = 512) of inputs spanning six
    decades and weights two (the issue's accuracy criterion; F(4x4) and F(2x2))."""
    rng = np.random.default_rng(5)
    n, c, hw, k = 1, 512, 10, 24
    x = (rng.standard_normal((n, c, hw, hw)) * 10.0 ** rng.uniform(-3, 3, (n, c, hw, hw))).astype(dtype)
    w = (rng.standard_normal((k, c, 3, 3)) * 10.0 ** rng.uniform(-1, 1, (k, c, 3, 3))).astype(dtype)
    exact = torch_conv2d(x, w, None, padding=1)
    scale = _conv_abs(x, w, 1)
    for m in (2, 4):
        got = _run(x, w, None, layout, m, padding=1)
        got = got if layout == "NCHW" else got.transpose(0, 3, 1, 2)
        ratio = (np.abs(got - exact) / scale).max()
        assert ratio <= BOUND[dtype], (m, ratio)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_finite_values_propagate_as_in_torch(layout):
    """An Inf or NaN in one input pixel spoils only the outputs whose window holds it (the
    transforms would smear it over the whole tile: the layer is recomputed directly);
    an Inf weight spoils every output, as in torch."""
    rng = np.random.default_rng(8)
    x, wt, b = make_problem(rng, 1, 16, 12, 12, 32, 3, 3)
    for value in (np.inf, np.nan):
        xs = x.copy()
        xs[0, 3, 5, 6] = value
        expected = torch_conv2d(xs, wt, b, padding=1)
        got = _run(xs, wt, b, layout, 4, padding=1)
        got = got if layout == "NCHW" else got.transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(expected))
        finite = np.isfinite(expected)
        assert finite.sum() > 0.9 * finite.size
        assert_close(got[finite], expected[finite], np.float32, 16 * 9)
    ws = wt.copy()
    ws[3, 2, 1, 1] = np.inf
    got = _run(x, ws, b, layout, 4, padding=1)
    expected = torch_conv2d(x, ws, b, padding=1)
    got = got if layout == "NCHW" else got.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))


def test_outputs_of_all_padding_windows_are_exactly_the_bias():
    """Outputs whose window is all zero padding get exactly the bias (the front door's
    compaction leaves them out of the tiles: a tile's transforms would leave rounding
    residue from its neighbours there)."""
    rng = np.random.default_rng(2)
    x, wt, b = make_problem(rng, 1, 32, 8, 8, 32, 3, 3)
    got = numbaconv.conv2d(x, wt, b, padding=4, algorithm="winograd")
    edge = np.broadcast_to(b.reshape(1, -1, 1, 1), got[:, :, :2, :].shape)
    np.testing.assert_array_equal(got[:, :, :2, :], edge)
    assert_close(got, torch_conv2d(x, wt, b, padding=4), np.float32, 32 * 9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_other_geometry_runs_the_direct_path(layout, monkeypatch):
    """Strided, dilated, 5x5 and depthwise layers are handed to ``tiled`` (and still give
    torch's answer through ``algorithm="winograd"``)."""
    calls = []
    real = tiled.bind
    monkeypatch.setattr(tiled, "bind", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(4)
    for (c, k, r, kw) in ((16, 32, 3, dict(stride=2, padding=1)), (16, 32, 3, dict(dilation=2, padding=2)),
                          (16, 32, 5, dict(padding=2)), (16, 16, 3, dict(groups=16, padding=1))):
        x, wt, b = make_problem(rng, 1, c, 9, 9, k, r, r, groups=kw.get("groups", 1))
        xa = to_act(x, layout)
        wa = wt if layout == "NCHW" else to_weight(wt, "HWIO")
        got = numbaconv.conv2d(xa, wa, b, layout=layout, algorithm="winograd", **kw)
        assert_close(got, to_act(torch_conv2d(x, wt, b, **kw), layout), np.float32, (c // kw.get("groups", 1)) * r * r)
    assert len(calls) == 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_transformed_weight_cache_sees_changes(layout):
    """Transformed weights are reused only for bit-identical weights (in-place edits and
    -0.0 vs 0.0 transform afresh), and layers of one shape keep an entry each."""
    winograd.clear_cache()
    rng = np.random.default_rng(12)
    x, wt, b = make_problem(rng, 1, 16, 8, 8, 32, 3, 3)
    wt2 = rng.standard_normal(wt.shape).astype(np.float32)
    xa = to_act(x, layout)
    wl = "OIHW" if layout == "NCHW" else "HWIO"

    def check(w_oihw, w_arr):
        got = numbaconv.conv2d(xa, w_arr, b, padding=1, layout=layout, weight_layout=wl, algorithm="winograd")
        assert_close(got, to_act(torch_conv2d(x, w_oihw, b, padding=1), layout), np.float32, 16 * 9)

    wa, wa2 = (to_weight(w, wl).copy() for w in (wt, wt2))
    stats = winograd._cache_stats
    check(wt, wa)
    hits = stats["hits"]
    check(wt2, wa2)
    check(wt, wa)  # two layers of one shape: both stay cached
    check(wt2, wa2)
    assert stats["hits"] == hits + 2
    wa *= -1
    check(-wt, wa)
    wa[...] = -0.0
    numbaconv.conv2d(xa, wa, b, padding=1, layout=layout, weight_layout=wl, algorithm="winograd")
    assert stats["hits"] == hits + 2
    winograd.clear_cache()


def test_error_next_to_tiled():
    """Winograd's float32 error on ResNet-like data is a small multiple of the direct
    kernel's (printed with ``-s``; the README quotes it), far inside SPEC's bound."""
    rng = np.random.default_rng(9)
    x, wt, b = make_problem(rng, 1, 256, 14, 14, 64, 3, 3)
    exact = torch_conv2d(x, wt, b, padding=1)
    scale = _conv_abs(x, wt, 1)
    ratios = {}
    for name in ("tiled", "winograd"):
        got = numbaconv.conv2d(x, wt, b, padding=1, algorithm=name)
        ratios[name] = float((np.abs(got - exact) / scale).max())
    print("max |y - y_exact| / conv(|x|, |w|):", ratios)
    assert ratios["winograd"] <= BOUND[np.float32]
    assert ratios["winograd"] < 50 * ratios["tiled"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [(2, 32, 10, 9, 48, 1, 1), (1, 64, 12, 12, 32, 2, ((2, 0), (1, 2))), (1, 32, 9, 9, 40, 1, 0)])
def test_grad_input_runs_winograd_on_the_layer_weights(case, layout, monkeypatch):
    """The backward's grad-input of a stride-1 3x3 layer is Winograd's forward convolution
    with the flipped, channel-transposed kernels, transformed straight from the layer's
    weights (``flip=True``: no flipped copy); equal to torch's grad-input."""
    from reference import torch_grads
    n, c, h, w, k, groups, padding = case
    rng = np.random.default_rng(h * w + c)
    x, wt, b = make_problem(rng, n, c, h, w, k, 3, 3, groups=groups, dtype=np.float32)
    gy = rng.standard_normal(torch_conv2d(x, wt, b, padding=padding, groups=groups).shape).astype(np.float32)
    flips = []
    real = winograd.run
    monkeypatch.setattr(winograd, "run", lambda *a, **kw: flips.append(kw.get("flip")) or real(*a, **kw))
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    dx = numbaconv.conv2d_backward_input(to_act(gy, layout), to_act(x, layout).shape, to_weight(wt, wl),
                                         padding=padding, groups=groups, layout=layout, weight_layout=wl)
    expected = torch_grads(x, wt, b, gy, padding=padding, groups=groups)[0]
    assert flips == [True]
    assert_close(dx, to_act(expected, layout), np.float32, (k // groups) * 9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_input_with_a_non_finite_gradient_falls_back_with_flipped_weights(layout):
    from reference import torch_grads
    rng = np.random.default_rng(21)
    x, wt, b = make_problem(rng, 1, 32, 10, 10, 32, 3, 3)
    gy = rng.standard_normal((1, 32, 10, 10)).astype(np.float32)
    gy[0, 5, 4, 4] = np.inf
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    dx = numbaconv.conv2d_backward_input(to_act(gy, layout), to_act(x, layout).shape, to_weight(wt, wl), padding=1,
                                         layout=layout, weight_layout=wl)
    expected = to_act(torch_grads(x, wt, b, gy, padding=1)[0], layout)
    np.testing.assert_array_equal(np.isfinite(dx), np.isfinite(expected))
    finite = np.isfinite(expected)
    assert finite.mean() > 0.8
    assert_close(dx[finite], expected[finite], np.float32, 32 * 9)
