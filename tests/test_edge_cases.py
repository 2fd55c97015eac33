"""Regression tests for the edge cases of issue #20, one per defect, each against torch
(float64) or the contract's error.  The property suite (test_properties.py) and the
bounds-checked extreme geometry (extreme_geometry.py) explore around them."""

import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numbaconv
import reference as ref
from numbaconv.registry import REGISTRY

HOST = [name for name in numbaconv.algorithms() if REGISTRY[name].host] + ["auto"]


def t64(a):
    return torch.from_numpy(np.array(a, dtype=np.float64))


@pytest.mark.parametrize("dtype, c, k", [(np.float64, 1, 5), (np.float32, 1, 9), (np.float64, 16, 32)])
@pytest.mark.parametrize("algorithm", ["tiled", "auto"])
def test_nhwc_1x1_stride_along_width_only(dtype, c, k, algorithm):
    """1: tiled's strided-1x1 shortcut read the NHWC input in place when only the width was
    strided (it checked the height stride alone)."""
    rng = np.random.default_rng(0)
    x = rng.random((1, c, 1, 11)).astype(dtype)
    w = rng.random((k, c, 1, 1)).astype(dtype)
    expected = ref.to_act(ref.torch_conv2d(x, w, stride=(1, 2)), "NHWC")
    got = numbaconv.conv2d(ref.to_act(x, "NHWC"), ref.to_weight(w, "HWIO"), stride=(1, 2), layout="NHWC",
                           algorithm=algorithm)
    ref.assert_close(got, expected, dtype, c)
    # auto reaches the same shortcut with dilation != 1 or a materialised padding mode
    expected = ref.to_act(ref.torch_conv2d(x, w, stride=(1, 2), padding=1, padding_mode="replicate"), "NHWC")
    got = numbaconv.conv2d(ref.to_act(x, "NHWC"), ref.to_weight(w, "HWIO"), stride=(1, 2), padding=1,
                           padding_mode="replicate", layout="NHWC", algorithm=algorithm)
    ref.assert_close(got, expected, dtype, c)


def test_left_padding_wider_than_the_output_row():
    """2: the NCHW im2col fill zero-filled ``[0, lo)`` with ``lo`` past the row when the left
    padding alone spanned more than the output row (heap overflow, races).  Repeated calls
    must give torch's answer every time (the bounds-checked run is extreme_geometry.py)."""
    x = np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1) + 1
    expected = F.unfold(t64(x), (1, 3), padding=(0, 6), dilation=(1, 6)).numpy()
    for _ in range(50):
        np.testing.assert_array_equal(numbaconv.im2col(x, (1, 3), padding=(0, 6), dilation=(1, 6)), expected)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 8, 1, 1)).astype(np.float32)
    w = rng.standard_normal((8, 8, 1, 3)).astype(np.float32)
    y = numbaconv.conv2d(x, w, padding="same", dilation=(1, 6), algorithm="im2col")
    ref.assert_close(y, ref.torch_conv2d(x, w, padding="same", dilation=(1, 6)), np.float32, 24)
    gy = rng.standard_normal(y.shape).astype(np.float32)
    _, dw_t, _ = ref.torch_grads(x, w, np.zeros(8), gy, padding="same", dilation=(1, 6))
    for _ in range(50):
        _, dw, _ = numbaconv.conv2d_backward(gy, x, w, padding="same", dilation=(1, 6))
        ref.assert_close(dw, dw_t, np.float32, 1)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("shape", [(1, 2, 0, 5), (1, 2, 5, 0), (0, 2, 0, 5)])
def test_empty_spatial_axis_is_refused(mode, shape):
    """3: an empty spatial axis returned uninitialised memory (torch refuses it)."""
    with pytest.raises(ValueError, match="empty spatial axis"):
        numbaconv.conv2d(np.ones(shape, np.float32), np.ones((3, 2, 1, 1), np.float32), padding=1,
                         padding_mode=mode)


@pytest.mark.parametrize("kwargs, name", [
    (dict(stride=2**63), "stride"), (dict(stride=(1, 2**64)), "stride"), (dict(dilation=2**63), "dilation"),
    (dict(padding=2**63), "padding"), (dict(padding=((0, 2**62), (0, 0))), "padding"),
    (dict(padding="same", dilation=2**61), "padding"),
])
def test_integers_beyond_64_bit_geometry_are_refused(kwargs, name):
    """4: integers >= 2**63 reached the kernels (wrong results, OverflowError or a Numba
    TypingError); ``"same"`` with a huge dilation overflowed inside im2col."""
    x, w = np.ones((1, 1, 8, 8), np.float32), np.ones((1, 1, 3, 3), np.float32)
    for algorithm in HOST:
        with pytest.raises(ValueError, match=name):
            numbaconv.conv2d(x, w, algorithm=algorithm, **kwargs)


@pytest.mark.parametrize("name", ["stride", "padding", "dilation", "kernel_size"])
def test_im2col_integers_beyond_64_bit_geometry_are_refused(name):
    kwargs = dict(kernel_size=3)
    kwargs[name] = 2**63
    with pytest.raises(ValueError, match=name):
        numbaconv.im2col(np.ones((1, 1, 8, 8), np.float32), **kwargs)


@pytest.mark.parametrize("kwargs", [dict(stride=(1, 10**6)), dict(padding=1000, dilation=1000),
                                    dict(stride=2**61), dict(padding=1000, stride=(999, 1000)),
                                    dict(padding=(3, 2**40), stride=(1, 2**40))])
@pytest.mark.parametrize("algorithm", HOST)
def test_memory_does_not_grow_with_stride_dilation_or_padding(kwargs, algorithm):
    """5: tiled (and auto) allocated memory proportional to stride and padding (2.4 GB for
    ``stride=(1, 10**6)`` on an 8x8 image).  Results equal the contract's (gathered by
    index, no padding materialised in the oracle either)."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 16, 8, 8)).astype(np.float32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    tracemalloc.start()
    try:
        got = numbaconv.conv2d(x, w, algorithm=algorithm, **kwargs)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak} bytes"
    stride = kwargs.get("stride", 1)
    stride = (stride, stride) if isinstance(stride, int) else stride
    dilation = (kwargs.get("dilation", 1),) * 2
    pads = ref.explicit_padding(kwargs.get("padding", 0), (8, 8), (3, 3), stride, dilation)
    rows = range(min(got.shape[2], 40))
    cols = range(min(got.shape[3], 40))
    expected = ref.direct_conv2d(x, w, None, stride, pads, dilation, 1, rows, cols)
    ref.assert_close(got[:, :, :len(rows), :len(cols)], expected, np.float32, 16 * 9)


@pytest.mark.parametrize("call, match", [
    (lambda: numbaconv.conv2d(np.ones((1, 1, 8, 8), np.float32), np.ones((1, 1, 3, 3), np.float32),
                              padding=2**40), r"result would have shape \(1, 1, 2199023255558, 2199023255558\)"),
    (lambda: numbaconv.conv_transpose2d(np.ones((1, 1, 8, 8), np.float32), np.ones((1, 1, 3, 3), np.float32),
                                        stride=2**40), "result would have shape"),
    (lambda: numbaconv.conv_transpose2d(np.ones((1, 1, 8, 8), np.float32), np.ones((1, 1, 3, 3), np.float32),
                                        dilation=2**40), "result would have shape"),
    (lambda: numbaconv.col2im(np.ones((1, 9, 1), np.float32), (2**40, 2**40), 3, stride=2**40),
     "result would have shape"),
])
def test_oversized_results_are_named(call, match):
    """6: results too large to allocate raised numpy's "Maximum allowed dimension exceeded",
    which names no argument; now a ValueError with the shape, the bytes and the arguments."""
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert "bytes" in str(info.value) and ("padding=" in str(info.value) or "stride=" in str(info.value)
                                           or "output_size=" in str(info.value))


@pytest.mark.parametrize("algorithm", HOST)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("groups", [1, 2])
def test_nonfinite_weights_meet_the_zero_padding(algorithm, layout, bad, groups):
    """7: torch multiplies the zero padding by the weights (0 * inf = NaN at the borders);
    the kernels skip padding taps, so those outputs stayed finite."""
    c = 2 * groups
    x = np.ones((1, c, 3, 3))
    w = np.ones((2, c // groups, 3, 3))
    w[0, 0, 0, 0] = bad
    expected = ref.torch_conv2d(x, w, padding=1, groups=groups)
    got = numbaconv.conv2d(ref.to_act(x, layout), ref.to_weight(w, "OIHW" if layout == "NCHW" else "HWIO"),
                           padding=1, groups=groups, layout=layout, algorithm=algorithm)
    got = got if layout == "NCHW" else got.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
    fin = np.isfinite(expected)
    np.testing.assert_allclose(got[fin], expected[fin], rtol=1e-12)


@pytest.mark.parametrize("layout,wl", [("NCHW", "OIHW"), ("NHWC", "HWIO"), ("NHWC", "OIHW"), ("NCHW", "HWIO")])
def test_cached_weights_changed_in_place_to_nonfinite(layout, wl):
    """7 with weights big enough for the weight caches (which let the front door skip its
    scan when they compared the call's weights with a finite copy): an Inf written in place
    after finite calls gets torch's NaNs, through the cached algorithms and after them
    through ``naive`` (no cache: nothing verified in that call may be reused); weights in
    another layout than the kernels take go through the front door's cache of converted
    weights, which must see the changes too."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 64, 6, 6))
    w = rng.standard_normal((64, 64, 3, 3))  # 288 KiB in float64: cached
    xa, wa = ref.to_act(x, layout), np.ascontiguousarray(ref.to_weight(w, wl))
    oihw = wa if wl == "OIHW" else wa.transpose(3, 2, 0, 1)  # (a view: writes reach wa)
    for algorithm in ("tiled", "winograd", "tiled", "naive"):
        for value in (1.0, np.inf, 1.0, 2.0):
            oihw[3, 5, 0, 0] = value  # a corner tap: it meets the padding at the top-left outputs
            expected = ref.torch_conv2d(x, oihw.copy(), padding=1)
            got = numbaconv.conv2d(xa, wa, padding=1, layout=layout, weight_layout=wl, algorithm=algorithm)
            got = got if layout == "NCHW" else got.transpose(0, 3, 1, 2)
            np.testing.assert_array_equal(np.isnan(got), np.isnan(expected), err_msg=f"{algorithm} {value}")
            fin = np.isfinite(expected)
            np.testing.assert_allclose(got[fin], expected[fin], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 1000, 300_000])  # (the BLAS dot below 1 MiB, the parallel scan above)
def test_the_nonfinite_scan_behind_the_padding_products(dtype, size):
    """The front door's scan for Inf / NaN (which decides whether 7's NaNs are restored):
    exact for every position and sign, for strided views, and not fooled by finite values
    whose squares overflow (the small-array path's dot product then overflows to Inf)."""
    from numbaconv.padding import any_nonfinite
    rng = np.random.default_rng(size)
    a = rng.standard_normal(size).astype(dtype)
    assert not any_nonfinite(a)
    for bad in (np.inf, -np.inf, np.nan):
        for i in {0, size // 2, size - 1}:
            b = a.copy()
            b[i] = bad
            assert any_nonfinite(b)
    huge = np.full(size, np.finfo(dtype).max, dtype)
    huge[::2] *= -1
    assert not any_nonfinite(huge)
    grid = np.repeat(a[:, None], 3, axis=1)
    grid[-1, 0] = np.nan  # (outside the view)
    assert not any_nonfinite(grid[:, 1])
    grid[-1, 1] = np.nan
    assert any_nonfinite(grid[:, 1])


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("c, groups", [(1, 1), (2, 2), (8, 1)])
def test_nonfinite_grad_output_over_the_padding_reaches_grad_weight(layout, c, groups):
    """8: a NaN in grad_output at an output whose window lies wholly in the zero padding
    did not reach grad-weight on the few-channel and depthwise paths (torch: 0 * NaN)."""
    x = np.ones((1, c, 1, 3))
    w = np.ones((c, c // groups, 3, 3))
    y = ref.torch_conv2d(x, w, padding=3, groups=groups)
    gy = np.ones_like(y)
    gy[:, :, 0, 0] = np.nan
    _, dw_t, _ = ref.torch_grads(x, w, np.zeros(c), gy, padding=3, groups=groups)
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    _, dw, _ = numbaconv.conv2d_backward(ref.to_act(gy, layout), ref.to_act(x, layout), ref.to_weight(w, wl),
                                         padding=3, groups=groups, layout=layout)
    np.testing.assert_array_equal(np.isnan(dw), np.isnan(ref.to_weight(dw_t, wl)))
    assert np.isnan(dw).sum() == dw.size


def test_nonfinite_weights_in_the_grad_input_of_depthwise_layers():
    """Found by the property suite: the depthwise grad-input sweeps ran the filter over zero
    borders, so conv_transpose2d gave NaN where torch has no product with the NaN weight."""
    x = np.array([[[[0.5]], [[-0.25]]]])
    w = np.array([[[[np.nan, 2.0]]], [[[3.0, 4.0]]]])
    expected = F.conv_transpose2d(t64(x), t64(w), groups=2).numpy()
    for layout, wl in (("NCHW", "OIHW"), ("NHWC", "HWIO")):
        got = numbaconv.conv_transpose2d(ref.to_act(x, layout), ref.to_weight(w, wl), groups=2, layout=layout)
        np.testing.assert_array_equal(got if layout == "NCHW" else got.transpose(0, 3, 1, 2), expected)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_transpose_output_padding_beyond_the_stride_with_nonfinite_weights(layout, groups):
    """output_padding >= stride (allowed below the dilation) adds output rows that no input
    reaches: torch leaves them 0 (+ bias) even when a weight is Inf; the zero rows that
    stood in for them were multiplied by it (NaN)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 2 * groups, 3, 2))
    w = rng.standard_normal((2 * groups, 3, 2, 2))
    w[0, 1, 1, 0] = np.inf
    b = rng.standard_normal(3 * groups)
    kw = dict(stride=(1, 2), dilation=(3, 1), output_padding=(2, 1), padding=(1, 0), groups=groups)
    expected = F.conv_transpose2d(t64(x), t64(w), t64(b), **kw).numpy()
    xa = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    wa = w if layout == "NCHW" else np.ascontiguousarray(w.transpose(2, 3, 1, 0))
    got = numbaconv.conv_transpose2d(xa, wa, b, layout=layout, **kw)
    got = got if layout == "NCHW" else got.transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_tiled_memory_does_not_grow_with_dilated_padding(layout):
    """A 1-pixel image, 2x2 kernel, dilation and padding 1000: a zero-padded copy of the
    input would be 4x the result (256 MB for 64 MB); tiled must stay within input + result
    + its workspace bound, and equal torch."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 16, 1, 1)).astype(np.float32)
    w = rng.standard_normal((16, 16, 2, 2)).astype(np.float32)
    kw = dict(dilation=1000, padding=1000)
    xa = ref.to_act(x, layout)
    wa = ref.to_weight(w, "OIHW" if layout == "NCHW" else "HWIO")
    tracemalloc.start()
    try:
        got = numbaconv.conv2d(xa, wa, layout=layout, algorithm="tiled", **kw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= 2 * got.nbytes + (32 << 20), f"allocated {peak} bytes for a {got.nbytes}-byte result"
    got = got if layout == "NCHW" else got.transpose(0, 3, 1, 2)
    expected = ref.direct_conv2d(x, w, None, (1, 1), (1000,) * 4, (1000, 1000), 1, out_rows=[0, 1, 999, 1000],
                                 out_cols=[0, 500, 1000])
    ref.assert_close(got[:, :, [0, 1, 999, 1000]][:, :, :, [0, 500, 1000]], expected, np.float32, 64)


@pytest.mark.parametrize("algorithm", ["auto", "tiled", "winograd"])
@pytest.mark.parametrize("stride, k, rs, dilation", [(2, 16, 2, 1000), (3, 16, 2, 1000), (1, 1, 3, 1)])
def test_padding_mode_far_beyond_the_image_keeps_one_padded_copy(algorithm, stride, k, rs, dilation):
    """A 1x1 image replicate-padded by 1000: the materialised input (torch's F.pad, 192 MB here)
    was copied once more into tiled's / Winograd's layout (found by the property suite at 25x
    its budget: 449 MB where one padded copy, twice the result and 64 MB were allowed)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 1, 1))
    w = rng.standard_normal((k, 3, rs, rs))
    kw = dict(stride=stride, dilation=dilation, padding=1000, padding_mode="replicate")
    tracemalloc.start()
    try:
        got = numbaconv.conv2d(x, w, algorithm=algorithm, **kw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    padded = x.shape[0] * x.shape[1] * 2001 * 2001 * x.itemsize
    assert peak <= padded + 2 * got.nbytes + (64 << 20), f"allocated {peak >> 20} MiB"
    expected = ref.torch_conv2d(x, w, **kw)
    ref.assert_close(got, expected, np.float64, 3 * rs * rs)
