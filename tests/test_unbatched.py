"""Unbatched inputs (one image without its batch axis), as torch's conv2d / conv_transpose2d
take them: ``(C, H, W)`` in NCHW, ``(H, W, C)`` in NHWC; the result has the same rank."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numbaconv
import reference as ref
from numbaconv.registry import REGISTRY

HOST = [name for name in numbaconv.algorithms() if REGISTRY[name].host] + ["auto"]


def t64(a):
    return torch.from_numpy(np.asarray(a, np.float64))


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("algorithm", HOST)
def test_conv2d_unbatched_equals_torch(algorithm, layout):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 9, 11)).astype(np.float32)  # (C, H, W): torch's unbatched form
    w = rng.standard_normal((10, 3, 3, 2)).astype(np.float32)
    b = rng.standard_normal(10).astype(np.float32)
    kw = dict(stride=(2, 1), padding=1, groups=2)
    expected = F.conv2d(t64(x), t64(w), t64(b), **kw).numpy()  # torch: (K, Ho, Wo)
    xa = x if layout == "NCHW" else np.ascontiguousarray(x.transpose(1, 2, 0))
    got = numbaconv.conv2d(xa, w, b, layout=layout, weight_layout="OIHW", algorithm=algorithm, **kw)
    want = expected if layout == "NCHW" else expected.transpose(1, 2, 0)
    assert got.ndim == 3 and got.flags.c_contiguous
    ref.assert_close(got, want, np.float32, 3 * 3 * 2)
    out = np.empty_like(got)
    assert numbaconv.conv2d(xa, w, b, layout=layout, weight_layout="OIHW", algorithm=algorithm, out=out, **kw) is out
    np.testing.assert_array_equal(out, got)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_conv_transpose2d_unbatched_equals_torch(layout):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 5, 7))
    w = rng.standard_normal((4, 3, 3, 3))
    kw = dict(stride=2, padding=1, output_padding=1)
    expected = F.conv_transpose2d(t64(x), t64(w), **kw).numpy()  # (C_out, H_out, W_out)
    if layout == "NCHW":
        got = numbaconv.conv_transpose2d(x, w, **kw)
    else:  # (H, W, C) with the NHWC default weight order (R, S, C_out/groups, C_in)
        got = numbaconv.conv_transpose2d(np.ascontiguousarray(x.transpose(1, 2, 0)),
                                         np.ascontiguousarray(w.transpose(2, 3, 1, 0)), layout="NHWC", **kw)
        expected = expected.transpose(1, 2, 0)
    assert got.ndim == 3
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_unbatched_errors():
    x = np.zeros((4, 6, 6), np.float32)
    w = np.zeros((2, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"out must be 3-D for a 3-D \(unbatched\) x"):
        numbaconv.conv2d(x, w, out=np.zeros((1, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"out has shape"):
        numbaconv.conv2d(x, w, out=np.zeros((2, 5, 4), np.float32))
    with pytest.raises(ValueError, match=r"weight shape \(2, 4, 3, 3\).*C=5"):
        numbaconv.conv2d(np.zeros((5, 6, 6), np.float32), w)
    with pytest.raises(ValueError, match=r"x must be 4-D \(NCHW\) or 3-D"):
        numbaconv.conv2d(np.zeros((6, 6), np.float32), w)
