"""The depthwise and streaming kernels' fast paths against torch float64.

Shapes are small but large enough to reach each fast path of :mod:`numbaconv.cpu.depthwise`:
the NCHW zero-padded stride-phase planes (any stride and dilation, small planes), the flat
whole-plane sweep (stride 1, ``Wo == W``: "same" padding, with and without dilation), the NCHW single-sweep 3x3 rows (stride 1 without padding, stride 2, stride 3),
the NHWC ring of zero-padded rows with 4-pixel blocks (column stride 1), contiguous pixel runs (stride 1, few channels, rows wider than a run) and the
per-pixel path (stride 2, many channels), channel multipliers > 1, batch > 1, asymmetric
padding; and the streaming kernel's ring of planar rows in NHWC (row chunks across images).
"""

import pathlib
import re

import numba
import numpy as np
import pytest

from numbaconv.cpu import depthwise
from numbaconv.problem import ConvProblem
from reference import assert_close, make_problem, to_act, torch_conv2d

DTYPES = [np.float32, np.float64]
LAYOUTS = ["NCHW", "NHWC"]

# (n, c, h, w, k, r, s, kwargs) -- groups == c
DEPTHWISE = [
    (2, 5, 17, 23, 5, 3, 3, dict(padding=1)),                          # small plane: padded copy, batch 2
    (1, 3, 9, 40, 3, 3, 3, dict(padding=1)),                           # Wo == W
    (1, 2, 12, 36, 2, 3, 3, dict(padding=2, dilation=2)),              # flat plane, dilated
    (1, 4, 19, 21, 4, 3, 3, dict(padding=2, dilation=2)),              # flat plane, dilated
    (1, 3, 16, 37, 3, 3, 3, dict()),                                   # stride 1, Wo < W
    (1, 6, 21, 40, 6, 3, 3, dict(stride=2, padding=1)),                # stride 2
    (1, 2, 20, 31, 2, 3, 3, dict(stride=3, padding=((0, 2), (1, 0)))),  # stride 3, asymmetric
    (1, 3, 15, 18, 6, 3, 3, dict(padding=1)),                          # multiplier 2, flat
    (1, 40, 9, 12, 40, 3, 3, dict(padding=1)),                         # NHWC: runs of 6 pixels
    (1, 300, 6, 7, 300, 3, 3, dict(stride=2, padding=1)),              # NHWC: many channels
    (1, 4, 11, 13, 4, 5, 5, dict(padding=2)),                          # 5x5
    (1, 4, 3, 3, 4, 3, 3, dict(padding=3)),                            # padding wider than the kernel
    (1, 8, 7, 90, 8, 3, 3, dict(padding=2, dilation=(1, 2))),          # NHWC: dilated contiguous runs
    (2, 16, 6, 11, 16, 3, 3, dict(padding=(1, 0))),                    # NHWC: 4-pixel blocks, no w padding
    (3, 8, 5, 6, 8, 3, 3, dict(padding=((4, 5), (2, 0)))),             # NHWC ring: padding > 3 rows, batch 3
    (2, 3, 13, 14, 6, 3, 3, dict(stride=2, padding=2, dilation=2)),    # NCHW phases: dilated, multiplier 2
    (1, 4, 10, 17, 4, 3, 3, dict(stride=(2, 1), padding=(0, 1))),      # NCHW phases: mixed strides
    (2, 16, 9, 12, 16, 3, 3, dict(stride=2, padding=((1, 0), (0, 1)))),  # NHWC stride 2: per-pixel path
    (1, 24, 11, 16, 24, 3, 3, dict(stride=(3, 2))),                    # NHWC stride (3, 2): per-pixel path
    (2, 2, 7, 70, 4, 3, 3, dict(stride=(1, 2), padding=(1, 0))),      # NCHW row pairs: column phases, m = 2
    (1, 3, 13, 68, 3, 3, 3, dict(stride=2, padding=1)),               # NCHW row pairs, stride 2, odd last row
    (1, 13, 6, 9, 13, 3, 3, dict(padding=1)),                         # NHWC blocks: 8-channel groups + 5 left over
    (1, 16, 9, 14, 16, 3, 3, dict(padding=(2, 1), dilation=(2, 1))),  # NHWC rows: contiguous runs (row dilation)
    (2, 6, 14, 14, 6, 3, 3, dict(padding=1)),                         # NCHW narrow planes: 16-lane blocks, batch 2
    (1, 3, 16, 16, 3, 3, 3, dict(padding=1)),                         # ... rows of exactly one block
    (1, 2, 3, 3, 2, 3, 3, dict()),                                    # ... a single output pixel
    (1, 3, 11, 15, 3, 3, 3, dict(stride=2, padding=1)),               # NCHW column phases: odd width
    (2, 2, 9, 13, 4, 3, 3, dict(stride=2, padding=((0, 1), (2, 0)))), # ... odd width, left pad 2, m = 2
    (1, 2, 8, 9, 2, 3, 3, dict(stride=2)),                            # ... odd width, no padding
    (1, 4, 12, 40, 4, 1, 9, dict(padding=(0, 4))),                    # NCHW phases, 9 taps in a row (wide)
    (1, 4, 40, 40, 4, 9, 1, dict(padding=(4, 0))),                    # ... 9 taps in a column (wide)
    (1, 3, 14, 14, 3, 5, 5, dict(stride=2, padding=2)),               # NCHW phases, 5x5 stride 2 (tap sweep)
    (2, 12, 9, 16, 12, 5, 5, dict(padding=((6, 2), (2, 2)), dilation=(1, 2))),  # NHWC 5-tap rows: dilated,
    # (the first output row's kernel rows all in the padding)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: "x".join(map(str, c[:7])) + str(sorted(c[7].items())))
def test_depthwise_fast_paths(case, layout, dtype):
    n, c, h, w, k, r, s, kw = case
    rng = np.random.default_rng(abs(hash(case[:7])) % 2**32)
    x, wt, b = make_problem(rng, n, c, h, w, k, r, s, groups=c, dtype=dtype)
    expected = to_act(torch_conv2d(x, wt, b, groups=c, **kw), layout)
    xa = to_act(x, layout)
    p = ConvProblem.from_args(xa, wt, b, layout=layout, weight_layout="OIHW", groups=c, **kw)
    out = np.full(p.out_shape, np.nan, dtype)
    depthwise.run(p, xa, wt, b, out)
    assert_close(out, expected, dtype, r * s)
    out2 = np.full(p.out_shape, np.nan, dtype)
    depthwise.run(p, xa, wt, None, out2)  # no bias
    expected_nb = to_act(torch_conv2d(x, wt, None, groups=c, **kw), layout)
    assert_close(out2, expected_nb, dtype, r * s)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_streaming_rows_across_images(layout, monkeypatch):
    """Row chunks that straddle two images and more chunks than rows of one image."""
    rng = np.random.default_rng(7)
    for n, c, h, w, k, kw in [(3, 3, 7, 30, 3, {}), (2, 3, 6, 9, 3, dict(padding=1, stride=(2, 1))),
                              (1, 3, 8, 37, 3, dict(padding=1)),  # the seed's shape: K = C = 3, one sweep
                              (2, 3, 9, 18, 3, dict(padding=(2, 1), dilation=(2, 1))),
                              (2, 2, 9, 8, 1, dict(padding=((2, 0), (1, 1)), dilation=2))]:
        x, wt, b = make_problem(rng, n, c, h, w, k, 3, 3, dtype=np.float32)
        expected = to_act(torch_conv2d(x, wt, b, **kw), layout)
        xa = to_act(x, layout)
        p = ConvProblem.from_args(xa, wt, b, layout=layout, weight_layout="OIHW", **kw)
        out = np.full(p.out_shape, np.nan, np.float32)
        depthwise.run_streaming(p, xa, wt, b, out)
        assert_close(out, expected, np.float32, c * 9)


def test_nan_propagates():
    x = np.ones((1, 4, 8, 8), np.float32)
    x[0, 1, 3, 3] = np.nan
    x[0, 2, 5, 5] = np.inf
    wt = np.ones((4, 1, 3, 3), np.float32)
    for layout in LAYOUTS:
        xa = to_act(x, layout)
        p = ConvProblem.from_args(xa, wt, None, layout=layout, weight_layout="OIHW", groups=4, padding=1)
        out = np.empty(p.out_shape, np.float32)
        depthwise.run(p, xa, wt, None, out)
        o = out if layout == "NCHW" else out.transpose(0, 3, 1, 2)
        assert np.isnan(o[0, 1, 2:5, 2:5]).all() and np.isfinite(o[0, 1, 6:, 6:]).all()
        assert np.isinf(o[0, 2, 4:7, 4:7]).all() and np.isfinite(o[0, 0]).all()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", [DEPTHWISE[i] for i in (0, 5, 7, 13, 15, 23)],
                         ids=lambda c: "x".join(map(str, c[:7])) + str(sorted(c[7].items())))
def test_depthwise_takes_hwio_weights(case, layout):
    """``depthwise.run`` with HWIO weights (what ``tiled`` passes for NHWC): a view for NHWC,
    a transposing copy for NCHW -- the same result as with OIHW."""
    n, c, h, w, k, r, s, kw = case
    rng = np.random.default_rng(7)
    x, wt, b = make_problem(rng, n, c, h, w, k, r, s, groups=c, dtype=np.float64)
    xa = to_act(x, layout)
    p = ConvProblem.from_args(xa, wt, b, layout=layout, weight_layout="OIHW", groups=c, **kw)
    out = np.full(p.out_shape, np.nan)
    depthwise.run(p, xa, np.ascontiguousarray(wt.transpose(2, 3, 1, 0)), b, out, "HWIO")
    assert_close(out, to_act(torch_conv2d(x, wt, b, groups=c, **kw), layout), np.float64, r * s)


@pytest.mark.parametrize("case", [c for c in DEPTHWISE if c[5] == c[6] == 3],
                         ids=lambda c: "x".join(map(str, c[:7])) + str(sorted(c[7].items())))
def test_nchw_flat_plane_without_phase_copy(case, monkeypatch):
    """3x3 NCHW planes through the flat sweep with scalar borders (wide planes' path)."""
    monkeypatch.setattr(depthwise, "_PHASES_MAX_W", 0)
    monkeypatch.setattr(depthwise, "BLOCKS_MAX_PIXELS", 0)
    test_depthwise_fast_paths(case, "NCHW", np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: "x".join(map(str, c[:7])) + str(sorted(c[7].items())))
def test_nchw_phase_planes_without_channel_blocks(case, dtype, monkeypatch):
    """The small 3x3 planes that go through channel blocks, through the phase planes instead
    (what wider planes, dilation, multipliers and other kernel sizes run)."""
    monkeypatch.setattr(depthwise, "BLOCKS_MAX_PIXELS", 0)
    test_depthwise_fast_paths(case, "NCHW", dtype)


# (n, c, h, w, kwargs): NCHW 3x3 depthwise through channel blocks (channels-last copies)
CHANNEL_BLOCKS = [
    (1, 37, 7, 7, dict(padding=1)),                          # 2 whole blocks of 16 (or 1 of 32) + a partial one
    (2, 13, 9, 11, dict(stride=2, padding=1)),               # stride 2, fewer channels than a block, batch 2
    (1, 32, 6, 6, dict(padding=((2, 0), (0, 0)))),           # Wo = 4: one block per row; asymmetric padding
    (1, 20, 10, 9, dict(stride=(1, 2), padding=(0, 1))),     # row stride 1, column stride 2
    (1, 8, 12, 13, dict(stride=(3, 1))),                     # row stride 3, no padding; Wo = 11: overlapping blocks
    (1, 3, 28, 28, dict(padding=1)),                         # 30 x 30 = 900 padded pixels (under the limit)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CHANNEL_BLOCKS, ids=lambda c: "x".join(map(str, c[:4])) + str(sorted(c[4].items())))
def test_nchw_channel_blocks(case, dtype, monkeypatch):
    """Small NCHW planes in blocks of channels through channels-last copies and the NHWC
    register blocks: partial blocks, strides, padding, overlapping last pixel block, bias or
    none, and the fused epilogue (activation and residual) on the transposed-back planes."""
    import numbaconv
    from numbaconv.cpu.epilogue import python_reference

    runs = []
    real = depthwise._DW_NCHW_BLOCKS.run
    monkeypatch.setattr(depthwise._DW_NCHW_BLOCKS, "run", lambda *a: runs.append(1) or real(*a))
    n, c, h, w, kw = case
    rng = np.random.default_rng(abs(hash(case[:4])) % 2**32)
    x, wt, b = make_problem(rng, n, c, h, w, c, 3, 3, groups=c, dtype=dtype)
    for bias, activation, residual in ((b, None, False), (None, None, False), (b, "hardswish", True)):
        expected = torch_conv2d(x, wt, bias, groups=c, **kw)
        r = rng.standard_normal(expected.shape).astype(dtype) if residual else None
        if r is not None:
            expected = expected + r
        expected = np.vectorize(lambda v: python_reference(v, activation), otypes=[np.float64])(expected)
        got = numbaconv.conv2d(x, wt, bias, groups=c, algorithm="tiled", activation=activation, residual=r, **kw)
        assert_close(got, expected, dtype, 9)
    assert len(runs) == 3
