"""Property test: random geometry, every argument form, every host algorithm and layout vs torch float64."""

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import numbaconv
from numbaconv.registry import REGISTRY
from reference import assert_close, explicit_padding, to_act, to_weight, torch_conv2d

HOST_ALGORITHMS = [name for name in numbaconv.algorithms() if REGISTRY[name].host] + ["auto"]


@st.composite
def padding_forms(draw):
    kind = draw(st.sampled_from(["int", "pair", "pairs", "valid", "same"]))
    small = st.integers(0, 3)
    if kind == "int":
        return draw(small)
    if kind == "pair":
        return (draw(small), draw(small))
    if kind == "pairs":
        return ((draw(small), draw(small)), (draw(small), draw(small)))
    return kind


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(0, 2), cg=st.integers(1, 4), kg=st.integers(1, 4), groups=st.integers(1, 3),
    h=st.integers(1, 10), w=st.integers(1, 10), r=st.integers(1, 4), s=st.integers(1, 4),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=padding_forms(), mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    layout=st.sampled_from(["NCHW", "NHWC"]), weight_layout=st.sampled_from(["OIHW", "HWIO", "OHWI"]),
    algo=st.sampled_from(HOST_ALGORITHMS), dtype=st.sampled_from([np.float32, np.float64]),
    use_bias=st.booleans(), seed=st.integers(0, 2**16),
)
def test_random_geometry_matches_torch(n, cg, kg, groups, h, w, r, s, stride, dilation, padding, mode, layout,
                                       weight_layout, algo, dtype, use_bias, seed):
    c, k = cg * groups, kg * groups
    t, b, l, rt = explicit_padding(padding, (h, w), (r, s), stride, dilation)
    assume(dilation[0] * (r - 1) + 1 <= h + t + b and dilation[1] * (s - 1) + 1 <= w + l + rt)
    if mode == "reflect":
        assume(max(t, b) < h and max(l, rt) < w)
    if mode == "circular":
        assume(max(t, b) <= h and max(l, rt) <= w)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, cg, r, s)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype) if use_bias else None
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, padding_mode=mode)
    expected = to_act(torch_conv2d(x, wt, bias, **kwargs), layout)
    got = numbaconv.conv2d(to_act(x, layout), to_weight(wt, weight_layout), bias, layout=layout,
                           weight_layout=weight_layout, algorithm=algo, **kwargs)
    assert_close(got, expected, dtype, cg * r * s)
