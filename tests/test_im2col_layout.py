"""im2col / col2im against torch's unfold / fold, convert_layout, and the bounded im2col workspace."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numbaconv

UNFOLD_CASES = [
    ((2, 3, 7, 8), 3, {}),
    ((1, 2, 9, 6), (2, 3), {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}),
    ((3, 1, 5, 5), 5, {"padding": 2}),
    ((1, 4, 10, 11), (3, 1), {"stride": 3, "dilation": (2, 1), "padding": 1}),
    ((0, 2, 5, 5), 3, {}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,kernel,kwargs", UNFOLD_CASES)
def test_im2col_is_torch_unfold(shape, kernel, kwargs, dtype):
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    expected = F.unfold(torch.from_numpy(x), kernel, **kwargs).numpy()
    got = numbaconv.im2col(x, kernel, **kwargs)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,kernel,kwargs", UNFOLD_CASES)
def test_col2im_is_torch_fold(shape, kernel, kwargs, dtype):
    n, c, h, w = shape
    blocks = F.unfold(torch.zeros(shape, dtype=torch.float64), kernel, **kwargs).shape
    cols = np.random.default_rng(1).standard_normal(blocks).astype(dtype)
    expected = F.fold(torch.from_numpy(cols.astype(np.float64)), (h, w), kernel, **kwargs).numpy()
    got = numbaconv.col2im(cols, (h, w), kernel, **kwargs)
    assert got.shape == (n, c, h, w) and got.dtype == dtype
    np.testing.assert_allclose(got, expected, atol=1e-5 if dtype == np.float32 else 1e-12)


def test_im2col_accepts_any_strides():
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 9))
    view = np.asfortranarray(x)[:, ::-1, :, ::2]
    expected = F.unfold(torch.from_numpy(np.ascontiguousarray(view)), 3, padding=1).numpy()
    np.testing.assert_array_equal(numbaconv.im2col(view, 3, padding=1), expected)


@pytest.mark.parametrize("letters", ["NCHW", "OIHW"])
def test_convert_layout_every_permutation(letters):
    a = np.random.default_rng(3).standard_normal((2, 3, 4, 5))
    for perm in itertools.permutations(letters):
        dst = "".join(perm)
        b = numbaconv.convert_layout(a, letters, dst)
        assert b.flags.c_contiguous and not np.shares_memory(a, b)
        assert b.shape == tuple(a.shape[letters.index(ch)] for ch in dst)
        for idx in itertools.product(*[range(s) for s in a.shape]):
            pos = dict(zip(letters, idx))
            assert b[tuple(pos[ch] for ch in dst)] == a[idx]
            break  # one spot-check per permutation; the round trip below checks all elements
        np.testing.assert_array_equal(numbaconv.convert_layout(b, dst, letters), a)


def test_convert_layout_identity_is_a_copy():
    a = np.zeros((1, 2, 3, 4))
    b = numbaconv.convert_layout(a, "NCHW", "NCHW")
    assert not np.shares_memory(a, b)


MEMORY_SCRIPT = r"""
import json, resource, sys
import numpy as np
import numbaconv
layout = sys.argv[1]
n, c, h, w, k = 1, 128, 512, 512, 4
shape = (n, c, h, w) if layout == "NCHW" else (n, h, w, c)
wshape = (k, c, 3, 3) if layout == "NCHW" else (3, 3, c, k)
x = np.ones(shape, np.float32)
wt = np.full(wshape, 0.5, np.float32)
out = np.empty((n, k, h, w) if layout == "NCHW" else (n, h, w, k), np.float32)
small = np.ones((1, 2, 5, 5) if layout == "NCHW" else (1, 5, 5, 2), np.float32)
numbaconv.conv2d(small, wt[:, :2] if layout == "NCHW" else wt[:, :, :2], padding=1, layout=layout, algorithm="im2col")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
numbaconv.conv2d(x, wt, padding=1, layout=layout, algorithm="im2col", out=out)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
centre = out[0, 0, 10, 10] if layout == "NCHW" else out[0, 10, 10, 0]
print(json.dumps({"extra": after - before, "full_im2col": c * 9 * h * w * 4, "centre": float(centre)}))
"""


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_im2col_workspace_is_bounded(layout):
    """A problem whose full im2col matrix is 1.2 GiB runs with little extra peak memory (RSS, all allocators)."""
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, layout], capture_output=True, text=True, check=True)
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["full_im2col"] > 2**30
    assert m["centre"] == pytest.approx(128 * 9 * 0.5)  # the work was really done
    assert m["extra"] < 160 * 2**20, f"peak memory grew by {m['extra'] / 2**20:.0f} MiB"


def test_import_does_not_import_torch():
    code = "import sys, numbaconv; numbaconv.conv2d; print('torch' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
