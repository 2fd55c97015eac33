"""Extreme but valid geometry: padding, dilation or stride far beyond the image, 1-pixel
images, empty axes, integers near the 64-bit limit.

Not collected by default (no ``test_`` prefix): ``tests/test_properties.py`` runs this file
in a subprocess with ``NUMBA_BOUNDSCHECK=1``, so an out-of-bounds access in a kernel is an
``IndexError`` (a failed test) and a crash fails the parent test.  Each case must equal the
contract's result (``reference.direct_conv2d`` gathers taps by index and never materialises
the padding) or
raise ``TypeError`` / ``ValueError`` naming the argument, and must not allocate beyond the
memory bound (inputs + result + the workspace bound, measured with tracemalloc, which sees
NumPy's allocations).
"""

import os
import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import numbaconv
import reference as ref
from numbaconv.registry import REGISTRY

SCALE = float(os.environ.get("NUMBACONV_PROPERTY_SCALE", "1") or 1)
HOST_ALGORITHMS = [name for name in numbaconv.algorithms() if REGISTRY[name].host] + ["auto"]
#: memory a call may allocate besides its inputs and result (the workspace bound, 32 MiB,
#: with room for the small per-call buffers)
SLACK = 64 << 20
#: beyond this many output pixels the oracle checks a sample of rows and columns
FULL_CHECK_PIXELS = 4096
#: numbaconv computes every case whose numbers stay at most this (beyond, it may refuse)
COMPUTABLE = 2**40

@st.composite
def extreme(draw):
    """One regime per case, so most cases are valid: huge stride, huge dilation (with the
    padding that lets the kernel fit), huge padding (with a stride that keeps the result
    small), 1-pixel images, empty axes, and numbers at the 64-bit limit."""
    c = draw(st.sampled_from([1, 2, 3, 8, 16]))
    depthwise = c > 1 and draw(st.booleans())
    k = c * draw(st.sampled_from([1, 2])) if depthwise else draw(st.sampled_from([1, 2, 16]))
    regime = draw(st.sampled_from(["stride", "dilation", "padding", "tiny", "empty", "limit"]))
    axis = lambda values: st.tuples(st.sampled_from(values), st.sampled_from(values))  # noqa: E731
    hw = draw(axis([1, 2, 3, 5, 8]))
    rs = draw(axis([1, 2, 3]))
    stride, dilation = draw(axis([1, 2])), draw(axis([1, 2]))
    padding = draw(st.sampled_from([0, 1, "same", "valid", (1, 0), ((0, 2), (1, 0))]))
    n = draw(st.sampled_from([1, 2]))
    if regime == "stride":
        stride = draw(axis([1, 7, 10**6, 2**40, 2**61]))
    elif regime == "dilation":
        dilation = draw(axis([16, 1000, 2**40]))
        padding = draw(st.sampled_from(["same", (dilation[0] * (rs[0] - 1), dilation[1] * (rs[1] - 1)),
                                        ((dilation[0] * (rs[0] - 1), 0), (0, dilation[1] * (rs[1] - 1)))]))
    elif regime == "padding":
        big = draw(st.sampled_from([6, 100, 1000, 2**40]))
        padding = draw(st.sampled_from([big, (big, 1), ((big, 0), (1, big))]))
        stride = draw(axis([1, 2, 1000, 2**40, 2**41]))
        dilation = draw(axis([1, 1000]))
    elif regime == "tiny":
        hw = draw(axis([1, 2]))
        stride, dilation = draw(axis([1, 2, 3])), draw(axis([1, 2, 3]))
        padding = draw(st.sampled_from([0, 1, 2, "same", (0, 3)]))
    elif regime == "empty":
        n = draw(st.sampled_from([0, 1]))
        if n:
            hw = draw(st.sampled_from([(0, 3), (3, 0), (0, 0)]))
    else:
        value = draw(st.sampled_from([2**61, 2**61 + 1, 2**62, 2**63, 2**64]))
        key = draw(st.sampled_from(["stride", "dilation", "padding"]))
        stride, dilation, padding = ((value, 1) if key == "stride" else stride,
                                     (1, value) if key == "dilation" else dilation,
                                     value if key == "padding" else padding)
    return dict(n=n, c=c, k=k, groups=c if depthwise else 1, hw=hw, rs=rs, stride=stride, dilation=dilation,
                padding=padding, padding_mode=draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "replicate",
                                                                    "circular"])),
                layout=draw(st.sampled_from(["NCHW", "NHWC"])), algorithm=draw(st.sampled_from(HOST_ALGORITHMS)),
                dtype=draw(st.sampled_from([np.float32, np.float64])), bias=draw(st.booleans()))


def contract_result_shape(g):
    """The result's NCHW shape by SPEC.md's rules, or None where the arguments are invalid."""
    (h, w), (r, s) = g["hw"], g["rs"]
    if h == 0 or w == 0:
        return None  # torch refuses empty spatial axes
    pads = ref.explicit_padding(g["padding"], (h, w), (r, s), g["stride"], g["dilation"])
    if min(pads) < 0:
        return None
    top, bottom, left, right = pads
    if g["padding_mode"] == "reflect" and (max(top, bottom) >= h or max(left, right) >= w):
        return None
    if g["padding_mode"] == "circular" and (max(top, bottom) > h or max(left, right) > w):
        return None
    (dh, dw), (sh, sw) = g["dilation"], g["stride"]
    if dh * (r - 1) + 1 > h + top + bottom or dw * (s - 1) + 1 > w + left + right:
        return None
    return (g["n"], g["k"], ref.conv_out_size(h, r, sh, top, bottom, dh), ref.conv_out_size(w, s, sw, left, right, dw))


def sample(size):
    """Output indices the oracle checks: all of a short axis, else its ends and its middle."""
    if size <= 64:
        return list(range(size))
    mid = size // 2
    return sorted(set(range(20)) | set(range(mid - 10, mid + 10)) | set(range(size - 20, size)))


@settings(max_examples=int(400 * SCALE), derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(g=extreme(), seed=st.integers(0, 2**16))
def test_extreme_geometry(g, seed):
    rng = np.random.default_rng(seed)
    dtype = g["dtype"]
    (h, w), (r, s) = g["hw"], g["rs"]
    x = rng.standard_normal((g["n"], g["c"], h, w)).astype(dtype)
    wt = rng.standard_normal((g["k"], g["c"] // g["groups"], r, s)).astype(dtype)
    b = rng.standard_normal(g["k"]).astype(dtype) if g["bias"] else None
    kwargs = dict(stride=g["stride"], padding=g["padding"], dilation=g["dilation"], groups=g["groups"],
                  padding_mode=g["padding_mode"])
    layout = g["layout"]
    xl = ref.to_act(x, layout)
    wl = ref.to_weight(wt, "OIHW" if layout == "NCHW" else "HWIO")
    shape = contract_result_shape(g)
    numbers = [v for key in ("stride", "dilation") for v in g[key]]
    numbers += [v for v in np.ravel(np.array(g["padding"], dtype=object)) if not isinstance(v, str)]
    result_bytes = None if shape is None else int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
    must_compute = shape is not None and max(numbers) <= COMPUTABLE and result_bytes <= 64 << 20
    note(f"contract shape {shape}, must compute: {must_compute}")

    tracemalloc.start()
    try:
        got = numbaconv.conv2d(xl, wl, b, layout=layout, algorithm=g["algorithm"], **kwargs)
    except (TypeError, ValueError) as exc:
        event("refused")
        assert not must_compute, f"refused a computable case: {exc}"
        assert re.search(r"stride|padding|dilation|kernel|x |x has|weight|result", str(exc)), str(exc)
        return
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    event("computed" + (" (sampled)" if got.size > FULL_CHECK_PIXELS * g["k"] * g["n"] else ""))
    assert shape is not None, "accepted arguments the contract refuses"
    assert got.shape == ref.to_act(np.empty(shape, dtype=np.bool_), layout).shape
    # non-zero padding modes may materialise the padded input, as torch does (F.pad)
    pads = ref.explicit_padding(g["padding"], (h, w), (r, s), g["stride"], g["dilation"])
    padded = 0 if g["padding_mode"] == "zeros" else \
        g["n"] * g["c"] * (h + pads[0] + pads[1]) * (w + pads[2] + pads[3]) * np.dtype(dtype).itemsize
    assert peak <= xl.nbytes + wl.nbytes + got.nbytes * 2 + padded + SLACK, f"allocated {peak} bytes"
    if got.size == 0:
        return
    rows, cols = sample(shape[2]), sample(shape[3])
    oracle = lambda x_, w_, b_: ref.direct_conv2d(x_, w_, b_, g["stride"], pads, g["dilation"], g["groups"],  # noqa: E731
                                                  rows, cols, g["padding_mode"])
    expected = oracle(x, wt, b)
    bound = oracle(np.abs(x), np.abs(wt), None if b is None else np.abs(b))
    # rows and columns picked together: no intermediate copy of a whole (possibly 8 GiB) axis
    got_nchw = (got if layout == "NCHW" else got.transpose(0, 3, 1, 2))[:, :, np.array(rows)[:, None],
                                                                        np.array(cols)[None, :]]
    tol = 1e-4 if dtype == np.float32 else 1e-11
    np.testing.assert_array_less(np.abs(got_nchw - expected), tol * bound + np.finfo(dtype).tiny * 2)


@pytest.mark.parametrize("call", [
    lambda: numbaconv.im2col(np.ones((1, 8, 1, 1), np.float32), (1, 3), padding=(0, 6), dilation=(1, 6)),
    lambda: numbaconv.conv2d(np.ones((1, 1, 1, 1), np.float32), np.ones((1, 1, 1, 3), np.float32),
                             padding="same", dilation=(1, 16), algorithm="im2col"),
    lambda: numbaconv.conv2d_backward(np.ones((1, 8, 1, 1), np.float32), np.ones((1, 8, 1, 1), np.float32),
                                      np.ones((8, 8, 1, 3), np.float32), padding="same", dilation=(1, 6)),
])
def test_issue_cases_stay_in_bounds(call):
    """The cases that overran buffers (issue #20, item 2) run clean under bounds checking."""
    for _ in range(3):
        call()
