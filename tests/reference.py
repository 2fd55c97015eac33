"""The oracle for every test: torch in float64, plus small helpers to build test problems.

Nothing here calls numbaconv, so a bug in the library cannot leak into the expected
values.  Padding forms torch's ``conv2d`` lacks (asymmetric, "same" with stride > 1,
non-zero modes) are applied with ``torch.nn.functional.pad`` first, re-deriving the
contract's rules independently.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

torch.set_num_threads(2)

ACT_PERM = {"NCHW": (0, 1, 2, 3), "NHWC": (0, 2, 3, 1)}  # from NCHW
W_PERM = {"OIHW": (0, 1, 2, 3), "HWIO": (2, 3, 1, 0), "OHWI": (0, 2, 3, 1)}  # from OIHW
TORCH_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def explicit_padding(padding, in_hw, kernel_hw, stride, dilation):
    """(top, bottom, left, right) for every accepted padding form (SPEC.md's rules)."""
    if padding == "valid":
        return 0, 0, 0, 0
    if padding == "same":
        pads = []
        for size, k, s, d in zip(in_hw, kernel_hw, stride, dilation):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    if isinstance(padding, int):
        return padding, padding, padding, padding
    if isinstance(padding[0], (tuple, list)):
        (t, b), (l, r) = padding
        return t, b, l, r
    return padding[0], padding[0], padding[1], padding[1]


def torch_conv2d(x_nchw, w_oihw, bias=None, stride=1, padding=0, dilation=1, groups=1,
                 padding_mode="zeros"):
    """float64 NCHW result of torch for NCHW input / OIHW weights (numpy in, numpy out)."""
    x = torch.from_numpy(np.asarray(x_nchw, dtype=np.float64))
    w = torch.from_numpy(np.asarray(w_oihw, dtype=np.float64))
    b = None if bias is None else torch.from_numpy(np.asarray(bias, dtype=np.float64))
    stride, dilation = pair(stride), pair(dilation)
    t, bo, l, r = explicit_padding(padding, x.shape[2:], w.shape[2:], stride, dilation)
    if x.shape[0] == 0:
        x = torch.zeros((1,) + tuple(x.shape[1:]), dtype=torch.float64)
        y = F.conv2d(F.pad(x, (l, r, t, bo), mode=TORCH_MODE[padding_mode]), w, b, stride, 0, dilation, groups)
        return y.numpy()[:0]
    x = F.pad(x, (l, r, t, bo), mode=TORCH_MODE[padding_mode])
    return F.conv2d(x, w, b, stride, 0, dilation, groups).numpy()


def to_act(a_nchw, layout):
    return np.ascontiguousarray(np.transpose(a_nchw, ACT_PERM[layout]))


def to_weight(w_oihw, weight_layout):
    return np.ascontiguousarray(np.transpose(w_oihw, W_PERM[weight_layout]))


def tolerance(dtype, reduction):
    """Absolute tolerance for results of O(1) values summed over ``reduction`` terms."""
    eps = 2e-6 if np.dtype(dtype) == np.float32 else 1e-14
    return eps * max(reduction, 1) ** 0.75 * 8


def assert_close(actual, expected, dtype, reduction):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance(dtype, reduction))


def make_problem(rng, n, c, h, w, k, r, s, groups=1, dtype=np.float32, bias=True):
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c // groups, r, s)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype) if bias else None
    return x, wt, b


def torch_grads(x, w, b, gy, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    """float64 NCHW / OIHW gradients ``(dx, dw, db)`` of torch's conv2d (numpy in, numpy out)."""
    xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    wt = torch.tensor(np.asarray(w, np.float64), requires_grad=True)
    bt = torch.tensor(np.asarray(b, np.float64), requires_grad=True)
    stride, dilation = pair(stride), pair(dilation)
    t, bo, l, r = explicit_padding(padding, x.shape[2:], w.shape[2:], stride, dilation)
    y = F.conv2d(F.pad(xt, (l, r, t, bo), mode=TORCH_MODE[padding_mode]), wt, bt, stride, 0, dilation, groups)
    assert y.shape == gy.shape
    y.backward(torch.from_numpy(np.asarray(gy, np.float64)))
    return xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()


def conv_out_size(size, kernel, stride, before, after, dilation):
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


def _mode_index(i, size, mode):
    """torch's padding modes as index maps (``F.pad``'s definitions), on Python ints."""
    if mode == "reflect":  # edge excluded
        return -i if i < 0 else (2 * (size - 1) - i if i >= size else i)
    if mode == "replicate":
        return min(max(i, 0), size - 1)
    return i % size  # circular


def direct_conv2d(x_nchw, w_oihw, bias, stride, pads, dilation, groups, out_rows=None, out_cols=None,
                  padding_mode="zeros"):
    """Zero-padded conv2d (NCHW / OIHW, float64) without materialising the padding: each
    output pixel gathers its taps by index, so padding, stride and dilation may be far
    larger than the image (torch's F.pad would allocate them).  Padding zeros are
    multiplied by the weights as in torch (``0 * inf`` is NaN).  ``out_rows`` /
    ``out_cols``: compute only those output rows / columns (default: all).  Other padding
    modes map each tap's coordinate into the image (no zeros then)."""
    x = np.asarray(x_nchw, np.float64)
    w = np.asarray(w_oihw, np.float64)
    n, c, h, wd = x.shape
    k, cg, r, s = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    top, bottom, left, right = pads
    if out_rows is None:
        out_rows = range(conv_out_size(h, r, sh, top, bottom, dh))
    if out_cols is None:
        out_cols = range(conv_out_size(wd, s, sw, left, right, dw))
    ho, wo = len(out_rows), len(out_cols)
    rows = np.array([[i * sh + t * dh - top for t in range(r)] for i in out_rows], dtype=object).reshape(ho, r)
    cols = np.array([[j * sw + t * dw - left for t in range(s)] for j in out_cols], dtype=object).reshape(wo, s)
    if padding_mode != "zeros":
        rows = np.vectorize(lambda i: _mode_index(i, h, padding_mode), otypes=[object])(rows)
        cols = np.vectorize(lambda j: _mode_index(j, wd, padding_mode), otypes=[object])(cols)
    row_ok = (rows >= 0) & (rows < h)
    col_ok = (cols >= 0) & (cols < wd)
    ri = np.where(row_ok, rows, 0).astype(np.int64)
    ci = np.where(col_ok, cols, 0).astype(np.int64)
    # patches[n, c, i, j, r, s]
    patches = x[:, :, ri[:, None, :, None], ci[None, :, None, :]]
    patches = np.where((row_ok[:, None, :, None] & col_ok[None, :, None, :]), patches, 0.0)
    kg = k // groups
    out = np.empty((n, k, ho, wo))
    for g in range(groups):
        pg = patches[:, g * cg:(g + 1) * cg]
        out[:, g * kg:(g + 1) * kg] = np.einsum("ncijrs,kcrs->nkij", pg, w[g * kg:(g + 1) * kg])
    if bias is not None:
        out += np.asarray(bias, np.float64).reshape(1, k, 1, 1)
    return out
