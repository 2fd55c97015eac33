"""Max pooling of converted models (``numbaconv.cpu.pool``, ``numbaconv.torch.MaxPool2d``): equal
to torch's ``max_pool2d`` element for element (a maximum is exact) for every window form
torch accepts, both layouts and dtypes, with NaN and infinities where torch has them; the
module keeps torch's behaviour wherever the kernel does not apply (gradients, tracing,
other dtypes, arguments torch rejects)."""

import numpy as np
import pytest
import torch

import numbaconv.torch as nt
from numbaconv.cpu import pool

RNG = np.random.default_rng(7)

#: (H, W, kernel, stride, padding, dilation, ceil_mode): ResNet's stem pool, ceil_mode windows
#: past the right/bottom edge (GoogLeNet's), dilation, rectangles, padding at half the kernel
CASES = [
    (9, 10, 3, 2, 1, 1, False),
    (9, 10, 3, 2, 1, 1, True),
    (8, 8, 2, 2, 0, 1, False),
    (7, 7, 2, 2, 0, 1, True),
    (11, 12, 3, 1, 1, 2, True),
    (6, 7, (2, 3), (1, 2), (1, 0), (2, 1), True),
    (5, 5, 4, 1, 2, 1, False),
    (10, 9, 3, 3, 0, 1, True),
    (13, 5, (5, 1), (3, 1), (2, 0), 1, False),
    (4, 40, 3, 2, 1, 1, False),  # rows longer than two vectors
    (2, 1, (1, 2), 1, (0, 1), (1, 2), False),  # windows of padding only (dilation): -inf
    (1, 3, (2, 1), 1, (1, 0), (2, 1), False),
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def _input(h, w, dtype, c=5):
    x = RNG.standard_normal((2, c, h, w)).astype(dtype)
    flat = x.reshape(-1)
    idx = RNG.permutation(flat.size)
    flat[idx[:3]] = np.nan
    flat[idx[3:6]] = np.inf
    flat[idx[6:12]] = -np.inf
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_kernel_equals_torch(case, dtype):
    h, w, k, s, p, d, ceil = case
    args = tuple(map(_pair, (k, s, p, d)))
    x = _input(h, w, dtype)
    x_before = x.copy()
    want = torch.nn.functional.max_pool2d(torch.from_numpy(x), *args, ceil_mode=ceil).numpy()
    assert want.shape[2:] == (pool.out_size(h, args[0][0], args[1][0], args[2][0], args[3][0], ceil),
                              pool.out_size(w, args[0][1], args[1][1], args[2][1], args[3][1], ceil))
    nchw = pool.max_pool2d(x, *args, ceil, "NCHW")
    nhwc = pool.max_pool2d(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), *args, ceil, "NHWC")
    for got in (nchw, nhwc.transpose(0, 3, 1, 2), pool.max_pool2d_python(x, *args, ceil)):
        assert got.dtype == x.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)  # (NaN equals NaN here)
    np.testing.assert_array_equal(x, x_before)


def test_windows_of_one_value_and_all_minus_infinity():
    x = np.full((1, 2, 5, 5), -np.inf, dtype=np.float32)
    x[0, 1] = np.arange(25).reshape(5, 5)
    for layout, xa in (("NCHW", x), ("NHWC", np.ascontiguousarray(x.transpose(0, 2, 3, 1)))):
        got = pool.max_pool2d(xa, (1, 1), (2, 2), (0, 0), (1, 1), False, layout)
        if layout == "NHWC":
            got = got.transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(got, x[:, :, ::2, ::2])


def _pool_net(**kwargs):
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.MaxPool2d(**kwargs)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_converted_model_pools_on_numbaconv(dtype, monkeypatch):
    net = _pool_net(kernel_size=3, stride=2, padding=1).to(dtype)
    converted = nt.convert(net)
    pools = [m for m in converted.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert [type(m) for m in pools] == [nt.MaxPool2d]
    assert all(type(m) is torch.nn.MaxPool2d for m in net.modules() if isinstance(m, torch.nn.MaxPool2d))
    calls = []
    kernel = pool.max_pool2d
    monkeypatch.setattr(pool, "max_pool2d", lambda *a: calls.append(a[-1]) or kernel(*a))
    x = torch.randn(2, 3, 15, 16, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    with torch.no_grad():
        want = net(x)  # (the convolution's rounding differs from torch's: close, not equal)
        got = converted(x)
        torch.testing.assert_close(got, want, **tol)
        assert calls == ["NCHW"]
        xc = x.contiguous(memory_format=torch.channels_last)
        got = converted.to(memory_format=torch.channels_last)(xc)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got, want, **tol)
        assert calls == ["NCHW", "NHWC"]


def test_module_keeps_torch_where_the_kernel_does_not_apply(monkeypatch):
    calls = []
    kernel = pool.max_pool2d
    monkeypatch.setattr(pool, "max_pool2d", lambda *a: calls.append(a) or kernel(*a))
    m = nt.MaxPool2d(3, 2, 1)
    x = torch.randn(1, 4, 9, 9)
    # gradients: torch's op, which records them
    xg = x.clone().requires_grad_()
    y = m(xg)
    y.sum().backward()
    assert torch.equal(xg.grad, torch.autograd.grad(torch.nn.functional.max_pool2d(xg, 3, 2, 1).sum(), xg)[0])
    # unbatched, float16, a non-contiguous view, return_indices
    assert torch.equal(m(x[0]), torch.nn.functional.max_pool2d(x[0], 3, 2, 1))
    assert torch.equal(m(x.half()), torch.nn.functional.max_pool2d(x.half(), 3, 2, 1))
    view = x[:, :, ::2, :]
    assert torch.equal(m(view), torch.nn.functional.max_pool2d(view, 3, 2, 1))
    with_indices = nt.MaxPool2d(3, 2, 1, return_indices=True)
    got, idx = with_indices(x)
    want, want_idx = torch.nn.functional.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(got, want) and torch.equal(idx, want_idx)
    assert calls == []
    with torch.no_grad():  # and the plain case does reach the kernel
        assert torch.equal(m(xg), torch.nn.functional.max_pool2d(x, 3, 2, 1))
    assert len(calls) == 1


@pytest.mark.parametrize("kwargs, shape", [(dict(kernel_size=2, padding=2), (1, 2, 8, 8)),
                                           (dict(kernel_size=5), (1, 2, 3, 3))])
def test_arguments_torch_rejects_raise_torchs_error(kwargs, shape):
    x = torch.randn(*shape)
    with pytest.raises(RuntimeError) as want:
        torch.nn.MaxPool2d(**kwargs)(x)
    with pytest.raises(RuntimeError) as got:
        nt.MaxPool2d(**kwargs)(x)
    assert str(got.value) == str(want.value)
