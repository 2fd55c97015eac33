"""The ``tiled`` algorithm and its depthwise kernel against torch float64.

Shapes are tiny but chosen to hit every remainder of the blocking: output channels not a
multiple of the micro-kernel's ``V``, output widths not a multiple of its ``P`` pixels
(and smaller than ``P``), a single input channel, input-channel blocks (partial sums
added into the output), stride, dilation, groups, depthwise with multiplier 1 and 2, and
asymmetric padding -- in both layouts and both dtypes.
"""

import numba
import numpy as np
import pytest

import numbaconv
from numbaconv import tuning
from numbaconv.cpu import _blocking, depthwise, dot, pointwise, tiled
from numbaconv.problem import ConvProblem
from numbaconv.cpu._blocking import GEMM_P_CHOICES
from numbaconv.cpu.epilogue import python_reference
from reference import assert_close, make_problem, to_act, torch_conv2d

DTYPES = [np.float32, np.float64]
LAYOUTS = ["NCHW", "NHWC"]

# (n, c, h, w, k, r, s, kwargs)
DENSE = [
    (1, 5, 9, 11, 7, 3, 3, {}),                                       # K < V, Wo = 9 = P + 3
    (2, 16, 8, 13, 37, 3, 2, dict(stride=2, padding=((1, 0), (2, 1)), dilation=(1, 2))),
    (1, 1, 5, 4, 1, 1, 1, {}),                                        # C = 1, Wo < P
    (1, 8, 10, 10, 12, 3, 3, dict(groups=4, padding=1)),              # grouped
    (1, 3, 12, 17, 40, 7, 7, dict(stride=2, padding=3)),              # resnet_conv1-like
    (1, 6, 7, 7, 18, 3, 3, dict(groups=2, padding="same", dilation=2)),
    (1, 12, 9, 11, 20, 1, 1, dict(stride=2)),                        # strided 1x1: subsampled copy
    (2, 10, 9, 10, 20, 1, 1, dict(stride=(3, 2), groups=2)),
    (2, 10, 4, 8, 40, 1, 1, {}),                                      # NHWC 1x1: input used in place
    (1, 9, 6, 9, 64, 3, 3, dict(padding=1)),                          # NHWC: K a multiple of V, HWIO in place
    (2, 12, 7, 8, 64, 3, 3, dict(groups=2, stride=2, padding=1)),     # ... grouped, 32 per group
    (1, 9, 5, 6, 256, 3, 3, dict(padding=1)),                         # NHWC: K * itemsize >= 1 KiB, packed
    (2, 12, 9, 5, 20, 7, 1, dict(padding=((3, 2), (0, 0)))),          # R x 1 on short rows: flattened
    (1, 10, 11, 6, 38, 3, 1, dict(padding=((2, 1), (0, 0)), dilation=(2, 1), groups=2)),
    (1, 8, 6, 17, 16, 5, 1, {}),                                      # ... no padding (not flattened: 17)
]
DEPTHWISE = [
    (2, 6, 9, 11, 6, 3, 3, dict(groups=6, padding=1)),
    (1, 4, 8, 13, 8, 3, 2, dict(stride=2, groups=4, padding=((1, 0), (2, 1)), dilation=(1, 2))),  # m = 2
    (1, 3, 5, 6, 9, 2, 3, dict(groups=3)),                            # m = 3, no padding
]


def _check(case, layout, dtype, bias=True):
    n, c, h, w, k, r, s, kw = case
    rng = np.random.default_rng(hash((case[:7], layout)) % 2**32)
    x, wt, b = make_problem(rng, n, c, h, w, k, r, s, groups=kw.get("groups", 1), dtype=dtype, bias=bias)
    expected = to_act(torch_conv2d(x, wt, b, **kw), layout)
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    wa = wt if layout == "NCHW" else np.ascontiguousarray(wt.transpose(2, 3, 1, 0))
    got = numbaconv.conv2d(to_act(x, layout), wa, b, layout=layout, weight_layout=wl, algorithm="tiled", **kw)
    assert got.dtype == dtype and got.flags.c_contiguous
    assert_close(got, expected, dtype, (c // kw.get("groups", 1)) * r * s)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DENSE, ids=lambda c: "x".join(map(str, c[:7])))
def test_tiled_dense(case, layout, dtype):
    _check(case, layout, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", DEPTHWISE, ids=lambda c: "x".join(map(str, c[:7])))
def test_tiled_depthwise(case, layout, dtype):
    _check(case, layout, dtype)


@pytest.mark.parametrize("extra_k", [19, 0], ids=["packed", "whole_blocks"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiled_channel_blocks_no_bias(layout, extra_k, monkeypatch):
    """More input channels than one cache block: later blocks add into the output (NHWC
    with whole output-channel blocks reads the HWIO weights in place)."""
    real_plan = tiled.plan

    def small_blocks(p, m=1):
        b = real_plan(p, m)
        b["cb"] = 8
        b["rows"] = 2
        b["kbs"] = 2  # two output-channel blocks per work item (the last one partial)
        return b

    monkeypatch.setattr(tiled, "plan", small_blocks)
    _check((1, 20, 6, 9, extra_k + 2 * tiled.block_width(np.float32), 3, 3, dict(padding=1)), layout, np.float32,
           bias=False)


@pytest.mark.parametrize("blocks", [1, 2, None], ids=["one_block", "two_blocks", "all_blocks"])
@pytest.mark.parametrize("groups", [1, 2])
def test_nhwc_tasks_over_several_channel_blocks_with_epilogue(blocks, groups):
    """NHWC tasks sweep ``kbs`` output-channel blocks (``tiled.task_weight_bytes``: the budget
    of their weights): one, two of three (the last task's pair partial), or all of a group's;
    the fused residual + ReLU then runs over each task's channels of its pixels (one strided
    run per pixel, or a single run when the task has every channel) -- against torch."""
    v_ = tiled.block_width(np.float32)
    kg = 2 * v_ + 5  # three blocks per group, the last partial
    n, c, h, w, r = 2, 6 * groups, 7, 9, 3
    p = ConvProblem(n=n, c=c, h=h, w=w, k=kg * groups, r=r, s=r, pad_top=1, pad_bottom=1, pad_left=1,
                    pad_right=1, groups=groups, layout="NHWC", dtype=np.dtype(np.float32))
    block_bytes = r * r * (c // groups) * v_ * 4
    budget = 1 << 30 if blocks is None else blocks * block_bytes
    with tuning.override({"tiled.task_weight_bytes": budget}):
        assert tiled.plan(p)["kbs"] == (blocks or 3)
        rng = np.random.default_rng(blocks or 0)
        x, wt, b = make_problem(rng, n, c, h, w, kg * groups, r, r, groups=groups, dtype=np.float32)
        res = rng.standard_normal((n, kg * groups, h, w)).astype(np.float32)
        y = torch_conv2d(x, wt, b, padding=1, groups=groups) + res
        expected = to_act(np.where(y < 0, 0, y), "NHWC")
        got = numbaconv.conv2d(to_act(x, "NHWC"), np.ascontiguousarray(wt.transpose(2, 3, 1, 0)), b, padding=1,
                               groups=groups, layout="NHWC", algorithm="tiled", activation="relu",
                               residual=to_act(res, "NHWC"))
    assert_close(got, expected, np.float32, (c // groups) * r * r)


@pytest.mark.parametrize("layout, k", [("NCHW", 40), ("NHWC", 40), ("NHWC", 64)],
                         ids=["nchw", "nhwc_packed", "nhwc_hwio_in_place"])
@pytest.mark.parametrize("padding, stride, dilation, r", [
    (((2, 1), (1, 1)), 1, 1, 5),  # rows at the top and bottom lose some taps
    (((4, 3), (0, 0)), 1, 2, 3),  # dilated: the first image tap by ceil division
    (((3, 0), (1, 1)), 2, 1, 3),  # strided
    (((4, 4), (1, 1)), 1, 1, 3),  # whole output rows in the padding: bias alone
], ids=["asymmetric_5x5", "dilated", "strided", "rows_all_padding"])
def test_kernel_rows_in_the_padding_are_skipped(layout, k, padding, stride, dilation, r):
    """The driver runs only the kernel rows that read image rows (the others read zero
    padding): the weights' and input's offsets and the row count follow the skip -- against
    torch, in both layouts, on packed weights and on HWIO weights read in place."""
    n, c, h, w = 2, 8, 6, 9
    (pt, pb), (pl, pr) = padding
    p = ConvProblem(n=n, c=c, h=h, w=w, k=k, r=r, s=3, stride_h=stride, stride_w=stride, pad_top=pt,
                    pad_bottom=pb, pad_left=pl, pad_right=pr, dil_h=dilation, dil_w=dilation, layout=layout,
                    weight_layout="OIHW" if layout == "NCHW" else "HWIO", dtype=np.dtype(np.float32))
    assert tiled.route(p) == "generic"
    assert tiled.plan(p)["hwio"] == (k == 64 and tiled.block_width(np.float32) in (16, 32))
    rng = np.random.default_rng(k + r)
    x, wt, b = make_problem(rng, n, c, h, w, k, r, 3, dtype=np.float32)
    kw = dict(stride=stride, padding=padding, dilation=dilation)
    wl = wt if layout == "NCHW" else np.ascontiguousarray(wt.transpose(2, 3, 1, 0))
    got = numbaconv.conv2d(to_act(x, layout), wl, b, layout=layout, algorithm="tiled", **kw)
    assert_close(got, to_act(torch_conv2d(x, wt, b, **kw), layout), np.float32, c * r * 3)


def test_nhwc_wide_tasks_only_where_they_split_evenly():
    """On 2 threads: a 1x1 expansion at 56x56 sweeps several output-channel blocks per task (its
    epilogue over whole pixels); Inception's 17x17 3x3 keeps one block per task, whose row
    bands split evenly (17 rows in bands of 5, 5, 5, 2 left one thread 18 % more work)."""
    def problem(c, k, hw, r):
        return ConvProblem(n=1, c=c, h=hw, w=hw, k=k, r=r, s=r, pad_top=r // 2, pad_bottom=r // 2,
                           pad_left=r // 2, pad_right=r // 2, layout="NHWC", dtype=np.dtype(np.float32))
    expansion, inception = problem(64, 256, 56, 1), problem(128, 128, 17, 3)
    assert tiled._plan(expansion, 2, tuning.generation())["kbs"] > 1
    b = tiled._plan(inception, 2, tuning.generation())
    assert tiled._imbalance(inception, b["kbg"], b["kbs"], b["rows"], 2) <= 1.1
    # (the split it avoided: 4 blocks in pairs, rows in bands of 5, where 32 lanes make 4 blocks)
    if b["kbg"] == 4:
        assert tiled._imbalance(inception, 4, 2, 5, 2) == pytest.approx(20 / 17)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [c for c in DENSE if c[7].get("groups", 1) == 1 and c[4] > 8
                                  and not (c[5] == c[6] == 1 and not c[7])],
                         ids=lambda c: "x".join(map(str, c[:7])))
def test_dot_path_for_deep_nchw_layers(case, dtype, monkeypatch):
    """The dense cases with enough output channels not to stream (every remainder of its
    5 x 5 blocks, stride, dilation, padding, strided 1x1, batch 2) through
    :mod:`numbaconv.cpu.dot`, its size thresholds lifted (plain 1x1 layers go to pointwise),
    on every target (AVX-512 ones leave it off by default)."""
    monkeypatch.setattr(dot, "ENABLED", True)
    monkeypatch.setattr(dot, "MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(dot, "MAX_PIXELS", 10**6)
    called = []
    real = dot.run
    monkeypatch.setattr(dot, "run", lambda *a: called.append(1) or real(*a))
    _check(case, "NCHW", dtype)
    _check(case, "NCHW", dtype, bias=False)
    assert called


def test_dot_path_is_taken_for_res5_like_layers(monkeypatch):
    """A 1.2 MB OIHW weight on a 5x5 image goes to :mod:`numbaconv.cpu.dot` unpatched on AVX2
    targets (its choice rules: NCHW, dense, few pixels, large weights); NHWC and big images do
    not; on AVX-512 targets none does (the packed register blocks are faster there)."""
    def applies(n, c, hw, k, layout="NCHW", groups=1):
        return dot.applies(ConvProblem(n=n, c=c, h=hw, w=hw, k=k, r=3, s=3, pad_top=1, pad_bottom=1,
                                       pad_left=1, pad_right=1, groups=groups, layout=layout))
    assert dot.ENABLED == (tiled.vector_bytes() < 64)
    if not dot.ENABLED:
        assert not applies(1, 512, 7, 512)
        monkeypatch.setattr(dot, "ENABLED", True)
    assert applies(1, 256, 5, 128) and applies(1, 512, 7, 512) and applies(2, 512, 7, 512)
    assert not applies(1, 512, 7, 512, layout="NHWC")
    assert not applies(1, 256, 14, 256)  # 196 pixels: packed weights pay off
    assert not applies(1, 16, 5, 16)  # small weights pack cheaply
    assert not applies(1, 512, 7, 512, groups=2)
    _check((1, 256, 5, 5, 128, 3, 3, dict(padding=1)), "NCHW", np.float32)


def test_plans_pack_the_weights_dot_reads_in_place(monkeypatch):
    """dot avoids packing per call; a Conv2dPlan packs once, so its calls run the packed
    register blocks (faster there: Zen 3, res5), and equal torch."""
    monkeypatch.setattr(dot, "ENABLED", True)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 256, 5, 5)).astype(np.float32)
    w = rng.standard_normal((128, 256, 3, 3)).astype(np.float32)
    p = ConvProblem.from_args(x, w, None, padding=1)
    assert tiled.route(p) == "dot" and tiled.route(p, prepared=True) == "generic"
    called = []
    monkeypatch.setattr(dot, "run", lambda *a, **k: called.append(1))
    y = numbaconv.Conv2dPlan(w, padding=1, algorithm="tiled")(x)
    assert not called
    assert_close(y, torch_conv2d(x, w, padding=1), np.float32, 256 * 9)


# (n, c, h, w, k): NCHW 1x1 layers for numbaconv.cpu.pointwise
POINTWISE = [
    (1, 7, 4, 4, 16),     # one whole pixel block (V = 16 float32 on AVX2); K = 6 + 6 + 4
    (2, 5, 3, 7, 13),     # pixel tail only (21 < V or 21 = V + 5), odd K: zero weight rows appended
    (1, 40, 9, 9, 30),    # 81 pixels: whole blocks and a tail; mixed channel blocks
    (3, 1, 2, 3, 5),      # C = 1, 6 pixels, K = 5: one block
    (1, 3, 6, 6, 1),      # K = 1 and 2: NCHW 1x1 layers with few output channels run here too,
    (2, 4, 5, 5, 2),      # not on the streaming kernel (pixels fill the vectors, not channels)
    (1, 33, 5, 7, 7),     # K = 7 = 4 + 3 (or one zero-padded block of 8 on AVX-512)
    (1, 9, 4, 7, 10),     # 28 pixels: a tail of 12, on the block that ends the plane (read in place)
]


def _pointwise_check(case, dtype, activation=None, residual=False, bias=True):
    n, c, h, w, k = case
    rng = np.random.default_rng(hash(case) % 2**32)
    x, wt, b = make_problem(rng, n, c, h, w, k, 1, 1, dtype=dtype, bias=bias)
    r = rng.standard_normal((n, k, h, w)).astype(dtype) if residual else None
    expected = torch_conv2d(x, wt, b)
    if r is not None:
        expected = expected + r
    expected = np.vectorize(lambda v: python_reference(v, activation), otypes=[np.float64])(expected)
    got = numbaconv.conv2d(x, wt, b, algorithm="tiled", activation=activation, residual=r)
    assert got.dtype == dtype and got.flags.c_contiguous
    assert_close(got, expected, dtype, c)


@pytest.fixture(autouse=True)
def _pointwise_on_small_images(request, monkeypatch):
    """The pointwise tests' small images (their blocks' every remainder) run the pointwise
    kernel on every target: AVX-512 ones send images under ``MIN_PIXELS`` elsewhere."""
    if "pointwise" in request.node.name:
        monkeypatch.setattr(pointwise, "MIN_PIXELS", 0)


def test_nchw_1x1_layers_with_many_channels_route_to_the_packed_blocks():
    """float32 NCHW 1x1 layers with 256+ input and output channels run tiled's packed
    channel-vector blocks (the GEMM streamed their weights once per pixel block); narrower
    ones and float64 the in-place GEMM -- and both agree with torch."""
    def route(c, k, dtype=np.float32):
        x, w = np.zeros((1, c, 14, 14), dtype), np.zeros((k, c, 1, 1), dtype)
        return tiled.route(ConvProblem.from_args(x, w, None))
    assert route(256, 256) == route(1024, 512) == "generic"
    assert route(512, 128) == route(128, 512) == route(256, 255) == "pointwise"
    assert route(512, 512, np.float64) == "pointwise"
    _check((2, 256, 14, 14, 264, 1, 1, {}), "NCHW", np.float32)


def test_small_nchw_1x1_images_route_by_vector_width():
    """On AVX-512 targets a 7x7 NCHW 1x1 layer (49 pixels) runs tiled's channel-vector blocks,
    a 14x14 one the in-place GEMM; on AVX2 both run the GEMM."""
    def route(hw):
        x, w = np.zeros((1, 64, hw, hw), np.float32), np.zeros((128, 64, 1, 1), np.float32)
        return tiled.route(ConvProblem.from_args(x, w, None))
    assert route(14) == "pointwise"
    assert route(7) == ("generic" if tiled.vector_bytes() >= 64 else "pointwise")
    _check((1, 64, 7, 7, 128, 1, 1, {}), "NCHW", np.float32)


def test_pointwise_tasks_on_small_planes_split_by_channels():
    """A plane of a few pixel blocks (MobileNet's 7x7) gives every task all of its pixel
    blocks and a share of the output channels, so the tail block (no copy) is in every task;
    larger planes split by pixel blocks first.  Either way the tasks cover each (pixel block,
    channel block) once and there are enough of them for the threads."""
    def tasks(c, k, hw):
        p = ConvProblem.from_args(np.zeros((1, c, hw, hw), np.float32), np.zeros((k, c, 1, 1), np.float32), None)
        starts, v_, nqb, qbs, nqc, kbs, jobs = pointwise.layer(p)
        nkb = starts.size - 1
        nkc = -(-nkb // kbs)  # (task t: pixel chunk t // nkc, channel chunk t % nkc, as the task function)
        cover = sorted((qb, kb) for t in range(jobs)
                       for qb in range(t // nkc * qbs, min(nqb, (t // nkc + 1) * qbs))
                       for kb in range(t % nkc * kbs, min(nkb, (t % nkc + 1) * kbs)))
        assert cover == [(qb, kb) for qb in range(nqb) for kb in range(nkb)]
        assert jobs >= min(4 * numba.get_num_threads(), nqb * nkb)
        return nqb, qbs
    nqb, qbs = tasks(960, 160, 7)
    assert nqb <= pointwise.FEW_PIXEL_BLOCKS and qbs == nqb
    nqb, qbs = tasks(64, 384, 28)
    assert nqb > pointwise.FEW_PIXEL_BLOCKS and qbs < nqb


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", POINTWISE, ids=lambda c: "x".join(map(str, c)))
def test_pointwise_path_for_nchw_1x1(case, dtype, monkeypatch):
    """NCHW 1x1 layers run as a GEMM on the input in place (numbaconv.cpu.pointwise): every
    remainder of its blocks (pixel tails, odd K, K below the smaller block), with and
    without bias, fused activation and residual (small images included on every target: AVX-512
    ones send images under ``MIN_PIXELS`` to the channel-vector blocks by default)."""
    called = []
    real = pointwise.bind
    monkeypatch.setattr(pointwise, "bind", lambda *a: called.append(1) or real(*a))
    _pointwise_check(case, dtype)
    _pointwise_check(case, dtype, bias=False)
    _pointwise_check(case, dtype, activation="relu6", residual=True)
    assert called


@pytest.mark.parametrize("dtype", DTYPES)
def test_pointwise_channel_blocks_and_task_splits(dtype, monkeypatch):
    """Input channels in several L1 blocks (later blocks added into the output, partial
    blocks through the scatter), and tasks split along pixel blocks and channel blocks."""
    monkeypatch.setattr(pointwise, "PANEL_BYTES", 8 * 8 * 8)  # 8 channels per block
    for task_bytes in (1, 1 << 20):
        monkeypatch.setattr(pointwise, "TASK_BYTES", task_bytes)
        pointwise._layer.cache_clear()
        for case in [(2, 19, 5, 9, 14), (1, 20, 7, 7, 37)]:
            _pointwise_check(case, dtype, activation="silu", residual=True)
            _pointwise_check(case, dtype, bias=False)
    pointwise._layer.cache_clear()


def test_pointwise_padded_weights_see_changes(monkeypatch):
    """An odd K's weights with appended zero rows are cached (checked bit for bit): a change
    in place is seen, and ``clear_caches`` forgets them."""
    monkeypatch.setattr(pointwise._CACHE, "min_bytes", 0)
    rng = np.random.default_rng(5)
    x, wt, b = make_problem(rng, 1, 12, 5, 6, 13, 1, 1, dtype=np.float32)
    for _ in range(2):
        assert_close(numbaconv.conv2d(x, wt, b, algorithm="tiled"), torch_conv2d(x, wt, b), np.float32, 12)
    assert pointwise._CACHE.stats["hits"] >= 1
    wt *= -1
    assert_close(numbaconv.conv2d(x, wt, b, algorithm="tiled"), torch_conv2d(x, wt, b), np.float32, 12)
    numbaconv.clear_caches()
    assert not pointwise._CACHE._entries


@pytest.mark.parametrize("k", range(1, 70))
def test_pointwise_channel_blocks_cover_k(k):
    """The output-channel blocks start at 0, follow each other by the target's two block
    sizes and cover K; weight rows are appended (a copy) only when K is not a sum of them."""
    p = ConvProblem(n=1, c=8, h=5, w=5, k=k, r=1, s=1)
    starts = pointwise.layer(p)[0]
    sizes = set(np.diff(starts).tolist())
    assert starts[0] == 0 and starts[-1] >= k and starts[-2] < k
    assert sizes <= set(GEMM_P_CHOICES[tiled.vector_bytes()])
    if k % 2 == 0 and k >= 4 and GEMM_P_CHOICES[tiled.vector_bytes()] == (4, 6):
        assert starts[-1] == k


def test_pointwise_applies_only_to_plain_nchw_1x1():
    def applies(**kw):
        return pointwise.applies(ConvProblem(**{**dict(n=1, c=8, h=5, w=5, k=8, r=1, s=1), **kw}))
    assert applies()
    assert not applies(layout="NHWC", weight_layout="HWIO")
    assert not applies(r=3, s=3)
    assert not applies(stride_h=2, stride_w=2)
    assert not applies(pad_top=1)
    assert not applies(groups=2, c=8, k=8)


def test_plan_blocks_cover_the_problem():
    p = ConvProblem(n=1, c=512, h=7, w=7, k=512, r=3, s=3, pad_top=1, pad_bottom=1, pad_left=1, pad_right=1)
    b = tiled.plan(p)
    assert b["V"] in (8, 16, 32) and 1 <= b["cb"] <= p.c and 1 <= b["rows"] <= p.ho
    assert b["wp"] >= (_row_end(p.wo, b["P"], b["split"]) - 1) + p.s  # the last pixel block stays in bounds
    assert b["kbg"] * b["V"] >= p.k


def _row_end(wo, p_, split, small=None):
    """Where the driver's last pixel block of a row ends (its loop over ``j0``)."""
    small = min(tiled.P_CHOICES[tiled.vector_bytes()]) if small is None else small
    j0 = 0
    while j0 < wo:
        j0 += p_ if j0 < split else small
    return j0


def test_flat_rows_only_where_rows_waste_blocks():
    """R x 1 kernels at stride 1 without column padding run as one flattened row where the
    rows' block cover wastes more than the flat one (DENSE above checks their results)."""
    def flat(**kw):
        return tiled.flat_rows(ConvProblem(**{**dict(n=1, c=8, h=17, w=17, k=8, r=7, s=1, pad_top=3, pad_bottom=3),
                                              **kw}))
    big = max(tiled.P_CHOICES[tiled.vector_bytes()])
    assert flat(w=big + 1) and flat(w=5) and flat(dil_h=2, pad_top=6, pad_bottom=6, w=5)
    assert not flat(w=4 * big)  # whole blocks per row: nothing to gain
    assert not flat(s=3, r=1, pad_top=0, pad_bottom=0, pad_left=1, pad_right=1, w=5, h=5)  # 1 x R: rows differ
    assert not flat(pad_left=1, pad_right=1, w=5)
    assert not flat(stride_h=2, w=5) and not flat(stride_w=2, w=5)
    assert not flat(h=7, r=7, pad_top=0, pad_bottom=0, w=5)  # one output row
    assert flat(h=9, w=5, pad_top=3, pad_bottom=2)  # DENSE's first R x 1 case takes the flat path


@pytest.mark.parametrize("wo", range(1, 70))
def test_pixel_blocks_cover_each_row_with_little_padding(wo):
    """Mixed pixel blocks (the larger P up to ``split``, then the smaller): the row is covered
    with no more padded work than one block size alone, and for AVX2's sizes (4, 6) with none
    wherever 4s and 6s add up to the width."""
    for choices in ((4, 6), (7, 8)):
        p_, split = tiled.pixel_blocks(wo, choices)
        assert p_ in choices and 0 <= split <= wo
        end = _row_end(wo, p_, split, min(choices))
        assert wo <= end <= min(-(-wo // q) * q for q in choices)
        if choices == (4, 6) and wo % 2 == 0 and wo >= 4:
            assert end == wo, (p_, split)


def test_depthwise_is_dispatched(monkeypatch):
    called = []
    real = depthwise.bind
    monkeypatch.setattr(depthwise, "bind", lambda *a, **k: called.append(1) or real(*a, **k))
    x = np.ones((1, 4, 5, 5), np.float32)
    numbaconv.conv2d(x, np.ones((4, 1, 3, 3), np.float32), groups=4, algorithm="tiled")
    assert called


# (n, c, h, w, k, r, s, kwargs): at most V/2 output channels per group -- the narrow blocks
NARROW = [
    (1, 32, 6, 9, 32, 3, 3, dict(groups=2, padding=1)),               # 16 per group: one whole register
    (2, 24, 7, 17, 24, 3, 3, dict(groups=3, padding=1)),              # 8 per group; Wo = 17 = 14 + 3
    (1, 10, 9, 8, 9, 3, 3, dict(stride=2, padding=((1, 0), (2, 1)), dilation=(1, 2))),  # dense K = 9
    (1, 12, 5, 30, 5, 1, 3, dict(padding=(0, 1))),                   # K = 5, Wo = 30 = 14 + 14 + 2
    (1, 64, 4, 4, 16, 1, 1, {}),                                      # NHWC 1x1 in place
]


@pytest.fixture
def narrow_target(monkeypatch):
    """The narrow and packed-group blocks on every host: AVX-512 targets have both, AVX2 ones
    the narrow blocks; elsewhere the generated float32 ones stand in for a run (their speed is
    not measured there).  True where the host's own narrow blocks run (float64's too)."""
    vb = tiled.vector_bytes()
    native = vb in _blocking.NARROW_P_CHOICES
    if not native:
        monkeypatch.setattr(_blocking, "NARROW_P_CHOICES", {vb: (7, 14)})
        monkeypatch.setattr(tiled, "NARROW_P_CHOICES", _blocking.NARROW_P_CHOICES)
    if vb not in _blocking.GROUP_PACK_P_CHOICES:  # (AVX-512's 16-lane sets stand in)
        monkeypatch.setattr(_blocking, "GROUP_PACK_P_CHOICES", {vb: (7, 10)})
        monkeypatch.setattr(tiled, "GROUP_PACK_P_CHOICES", _blocking.GROUP_PACK_P_CHOICES)
        monkeypatch.setattr(_blocking, "GROUP_PACK_LANES", {vb: 16})
        monkeypatch.setattr(tiled, "GROUP_PACK_LANES", _blocking.GROUP_PACK_LANES)
        monkeypatch.setattr(_blocking, "GROUP_PACKS", {vb: (2, 4)})
    tiled._plan.cache_clear()
    yield native
    tiled._plan.cache_clear()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", NARROW, ids=lambda c: "x".join(map(str, c[:7])))
def test_narrow_blocks(case, layout, dtype, narrow_target):
    """Layers with at most V/2 output channels per group run one register of channels per
    pixel (every remainder: partial channel block, pixel blocks of 14 and 7 and past the row,
    stride, dilation, asymmetric padding, NHWC in place)."""
    if dtype == np.float64 and not narrow_target:
        pytest.skip("this host's stand-in narrow blocks are float32 only (float64's run on AVX2 and AVX-512 hosts)")
    n, c, h, w, k, r, s, kw = case
    groups = kw.get("groups", 1)
    x = np.zeros((n, c, h, w), dtype) if layout == "NCHW" else np.zeros((n, h, w, c), dtype)
    p = ConvProblem.from_args(x, np.zeros((k, c // groups, r, s), dtype) if layout == "NCHW"
                              else np.zeros((r, s, c // groups, k), dtype), None, layout=layout, **kw)
    # (float64's 16 per group fill two registers; on AVX2 dense layers with more than V/4
    # output channels keep the two-register block: test_narrow_rule)
    narrow = 2 * (k // groups) <= tiled.block_width(dtype) and (
        groups > 1 or 4 * (k // groups) <= tiled.block_width(dtype) or tiled.vector_bytes() >= 64)
    if pointwise.applies(p):  # (an NCHW 1x1 layer with enough pixels: the in-place GEMM on AVX2)
        assert tiled.route(p) == "pointwise"
    else:
        assert tiled.route(p) == "generic" and tiled.plan(p)["nv"] == (1 if narrow else 2)
        assert tiled.plan(p)["V"] == tiled.block_width(dtype) // (2 if narrow else 1)
    _check(case, layout, dtype)


def test_narrow_rule():
    """Which layers take the narrow blocks: at most V/2 output channels per group, on targets
    that have them; on AVX2 not dense layers with more than V/4 (slower there than the
    half-empty two-register block)."""
    from numbaconv.cpu._blocking import narrow_blocks
    v = tiled.block_width(np.float32)
    vb = tiled.vector_bytes()
    if vb not in tiled.NARROW_P_CHOICES:
        assert not narrow_blocks(np.float32, 1)
        return
    assert narrow_blocks(np.float32, v // 2, groups=2) and not narrow_blocks(np.float32, v // 2 + 1, groups=2)
    assert narrow_blocks(np.float32, v // 4) and narrow_blocks(np.float32, v // 4 + 1) == (vb >= 64)


# (n, c, h, w, groups, kwargs): as many input as output channels per group, 4 or 8 -- sets of
# lanes / (C/G) groups share one register (16 lanes on AVX-512, 8 on AVX2: 8 per group stay narrow) (float32; the last set may be partial); float64 stays narrow
GROUP_SETS = [
    (1, 32, 6, 9, 8, dict(padding=1)),                                # 4 per group: 2 sets of 4 groups
    (2, 64, 7, 17, 8, dict(padding=1)),                               # 8 per group: 4 sets of 2; Wo = 17 = 10 + 7
    (1, 32, 9, 8, 4, dict(stride=2, padding=((1, 0), (2, 1)), dilation=(1, 2))),
    (1, 48, 5, 23, 6, dict(padding=(0, 1))),                          # Wo = 23: blocks of 10 and 7, past the row
    (1, 24, 6, 6, 3, dict(padding=1)),                                # 3 groups of 8: a partial last pair
    (2, 28, 5, 12, 7, dict(padding=1, stride=(1, 2))),                # 7 groups of 4: a set of 3 at the end
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", GROUP_SETS, ids=lambda c: "x".join(map(str, c[:5])))
def test_packed_group_blocks(case, layout, dtype, narrow_target):
    """Grouped 3x3 layers with 4 or 8 channels per group run m groups per register: the
    interleaved input copy, the packed weights, the blocks' tuple broadcasts and their stores
    back in channel order (whole blocks in NHWC, transposed ones in NCHW), bias, every
    pixel-block remainder, stride, dilation, asymmetric padding."""
    if dtype == np.float64 and not narrow_target:
        pytest.skip("this host's stand-in narrow blocks are float32 only (float64's run on AVX2 and AVX-512 hosts)")
    n, c, h, w, groups, kw = case
    cg = c // groups
    x = np.zeros((n, c, h, w), dtype) if layout == "NCHW" else np.zeros((n, h, w, c), dtype)
    wt = np.zeros((c, cg, 3, 3), dtype) if layout == "NCHW" else np.zeros((3, 3, cg, c), dtype)
    p = ConvProblem.from_args(x, wt, None, layout=layout, groups=groups, **kw)
    layer = tiled._layer(p, numba.get_num_threads(), tuning.generation())
    vb = tiled.vector_bytes()  # (the fixture gives every host packed groups: AVX-512's as stand-ins)
    m = _blocking.GROUP_PACK_LANES[vb] // cg
    if dtype != np.float32 or m not in _blocking.GROUP_PACKS[vb]:
        m = 1
    assert layer[0] == "generic" and layer[2]["m"] == m and layer[1].groups == -(-groups // m)
    _check((n, c, h, w, c, 3, 3, dict(groups=groups, **kw)), layout, dtype)


def test_streaming_only_for_short_reductions(narrow_target):
    """Where the narrow blocks exist, few output channels stream only when each output reduces
    over fewer than STREAM_MAX_REDUCTION products (RGB inputs), or when there are one or two
    per group (NHWC: two only under 4x that reduction); others run the blocks."""
    def route(c, k, r, groups=1, layout="NCHW"):
        x, w = np.zeros((1, c, 8, 8), np.float32), np.zeros((k, c // groups, r, r), np.float32)
        if layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return tiled.route(ConvProblem.from_args(x, w, None, padding=r // 2, groups=groups, layout=layout,
                                                 weight_layout="OIHW"))
    assert route(3, 3, 3) == "streaming"            # 27 products: the seed notebook's layer
    assert route(3, 4, 3) == "streaming"
    assert route(8, 4, 3) == "generic"              # 72 products, 4 channels
    assert route(96, 96, 3, groups=12) == "generic"  # 8 per group, 72 products
    assert route(64, 96, 3, groups=32) == "streaming"  # depth multiplier 3: 2 x 9 = 18 products
    assert route(1, 1, 7) == route(3, 1, 7) == "streaming"  # one output channel: 49, 147 products
    assert route(1, 1, 9, layout="NHWC") == "streaming"
    assert route(8, 2, 3) == route(8, 2, 3, layout="NHWC") == "streaming"  # two: 72 products
    assert route(16, 2, 3) == "streaming" and route(16, 2, 3, layout="NHWC") == "generic"  # 144


def test_generated_microkernels_are_up_to_date():
    import pathlib
    path = pathlib.Path(tiled.__file__).with_name("_ukernels.py")
    assert path.read_text() == tiled.generate_source(), "run: python -m numbaconv.cpu.tiled"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_streaming_kernel(layout, dtype):
    """The few-channel streaming kernel (seed-notebook shape, tiny), called directly."""
    rng = np.random.default_rng(5)
    for n, c, h, w, k, r, s, kw in [(2, 3, 9, 12, 3, 3, 3, {}),
                                    (1, 4, 8, 9, 2, 3, 2, dict(stride=2, padding=((1, 0), (0, 2)), dilation=(2, 1))),
                                    (1, 4, 6, 7, 4, 3, 3, dict(groups=2, padding=1)),
                                    # one input channel per group, stride 1 along rows: the plane
                                    # sweep (8- and 1-vector blocks, a tail, padded borders)
                                    (2, 1, 9, 150, 1, 5, 5, dict(padding=2)),
                                    (1, 2, 12, 41, 4, 5, 3, dict(groups=2, padding=((2, 1), (1, 1)), dilation=(1, 2),
                                                                 stride=(2, 1))),
                                    (1, 1, 7, 70, 2, 4, 4, {})]:
        x, wt, b = make_problem(rng, n, c, h, w, k, r, s, groups=kw.get("groups", 1), dtype=dtype)
        expected = to_act(torch_conv2d(x, wt, b, **kw), layout)
        xa = to_act(x, layout)
        p = ConvProblem.from_args(xa, wt, b, layout=layout, weight_layout="OIHW", **kw)
        out = np.empty(p.out_shape, dtype)
        depthwise.run_streaming(p, xa, wt, b, out)
        assert_close(out, expected, dtype, (c // kw.get("groups", 1)) * r * s)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_weight_cache_sees_changes(layout, monkeypatch):
    """Cached packed weights are reused only for bit-identical weights: in-place edits,
    new arrays and -0.0 vs 0.0 all repack."""
    monkeypatch.setattr(tiled._CACHE, "min_bytes", 0)
    tiled.clear_cache()
    rng = np.random.default_rng(11)
    x, wt, b = make_problem(rng, 1, 9, 6, 7, 20, 3, 3, dtype=np.float32)
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    wa = wt.copy() if layout == "NCHW" else np.ascontiguousarray(wt.transpose(2, 3, 1, 0))
    xa = to_act(x, layout)

    def check(w_oihw):
        got = numbaconv.conv2d(xa, wa, b, padding=1, layout=layout, weight_layout=wl, algorithm="tiled")
        assert_close(got, to_act(torch_conv2d(x, w_oihw, b, padding=1), layout), np.float32, 9 * 9)

    check(wt)
    check(wt)  # a hit
    hits = tiled._cache_stats["hits"]
    wa *= -1  # same object, new values
    check(-wt)
    wa.fill(0.0)
    check(np.zeros_like(wt))
    wa[...] = -0.0  # equal to 0.0 but not bit-identical
    numbaconv.conv2d(xa, wa, b, padding=1, layout=layout, weight_layout=wl, algorithm="tiled")
    assert tiled._cache_stats["hits"] == hits
    tiled.clear_cache()
