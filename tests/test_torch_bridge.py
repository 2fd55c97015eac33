"""numbaconv.torch: the autograd Function, the nn.Conv2d drop-in, and training with it.
The oracle is torch's own convolution (float64)."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import numbaconv
import numbaconv.torch as nct
from reference import TORCH_MODE, explicit_padding, pair

torch.set_num_threads(2)


def test_import_numbaconv_does_not_import_torch():
    code = "import sys, numbaconv; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def torch_reference(x, w, b, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros"):
    stride, dilation = pair(stride), pair(dilation)
    t, bo, l, r = explicit_padding(padding, x.shape[2:], w.shape[2:], stride, dilation)
    return F.conv2d(F.pad(x, (l, r, t, bo), mode=TORCH_MODE[padding_mode]), w, b, stride, 0, dilation, groups)


# (id, N C H W K R S, kwargs) -- tiny: gradcheck runs O(numel) forwards
GRADCHECK_CASES = [
    ("basic", (1, 2, 5, 4, 3, 3, 3), {}),
    ("stride_pad", (2, 2, 5, 5, 2, 3, 2), {"stride": 2, "padding": 1}),
    ("dilation_asym_pad", (1, 2, 6, 5, 2, 2, 3), {"dilation": (2, 1), "padding": ((1, 0), (2, 1))}),
    ("same_even", (1, 1, 5, 4, 2, 4, 2), {"padding": "same"}),
    ("groups", (1, 4, 4, 4, 6, 3, 3), {"groups": 2, "padding": 1}),
    ("depthwise_stride2", (1, 3, 5, 5, 3, 3, 3), {"groups": 3, "padding": 1, "stride": 2}),
    ("reflect", (1, 2, 4, 5, 2, 3, 3), {"padding": 2, "padding_mode": "reflect"}),
    ("replicate", (1, 2, 4, 4, 2, 2, 3), {"padding": (1, 2), "padding_mode": "replicate"}),
    ("circular_stride", (1, 2, 5, 4, 2, 3, 3), {"padding": ((2, 1), (1, 3)), "stride": (2, 1),
                                               "padding_mode": "circular"}),
]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("case_id,shape,kwargs", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
def test_gradcheck(case_id, shape, kwargs, channels_last):
    n, c, h, w, k, r, s = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=torch.float64, generator=gen)
    wt = torch.randn(k, c // kwargs.get("groups", 1), r, s, dtype=torch.float64, generator=gen)
    b = torch.randn(k, dtype=torch.float64, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        wt = wt.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    wt.requires_grad_(True)
    b.requires_grad_(True)
    kw = dict(kwargs)
    mode = kw.pop("padding_mode", "zeros")
    fn = lambda x, wt, b: nct.conv2d(x, wt, b, padding_mode=mode, **kw)  # noqa: E731
    # channels-last repeats the grid with gradcheck's fast mode (random directions: 2 forwards
    # per input instead of 2 per element), the NCHW run is the full Jacobian.
    assert torch.autograd.gradcheck(fn, (x, wt, b), eps=1e-6, atol=1e-7, rtol=1e-6, fast_mode=channels_last)
    # and the values agree with torch's conv itself
    torch.testing.assert_close(fn(x, wt, b), torch_reference(x, wt, b, padding_mode=mode, **kw),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_function_grads_match_torch(dtype, channels_last):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 6, 9, 8, dtype=torch.float64, generator=gen)
    w0 = torch.randn(8, 3, 3, 3, dtype=torch.float64, generator=gen)
    b0 = torch.randn(8, dtype=torch.float64, generator=gen)
    gy = torch.randn(2, 8, 5, 4, dtype=torch.float64, generator=gen)
    kw = dict(stride=2, padding=1, groups=2)

    def grads(conv, cast):
        x, w, b = (t.to(cast).requires_grad_(True) for t in (x0, w0, b0))
        if channels_last:
            x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        y = conv(x, w, b, **kw)
        y.backward(gy.to(cast))
        return y, x.grad, w.grad, b.grad

    ours = grads(nct.conv2d, dtype)
    ref = grads(F.conv2d, torch.float64)
    atol = 1e-12 if dtype == torch.float64 else 2e-4
    for got, exp in zip(ours, ref):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=atol)
    if channels_last:
        assert ours[0].is_contiguous(memory_format=torch.channels_last)
        assert ours[1].is_contiguous(memory_format=torch.channels_last)


def test_channels_last_runs_nhwc_without_copy(monkeypatch):
    seen = {}
    real = numbaconv.conv2d

    def spy(x, weight, bias=None, **kw):
        seen["layout"], seen["weight_layout"] = kw["layout"], kw["weight_layout"]
        seen["x"], seen["weight"] = x, weight
        return real(x, weight, bias, **kw)

    monkeypatch.setattr(numbaconv, "conv2d", spy)
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    y = nct.conv2d(x, w, padding=1)
    assert seen["layout"] == "NHWC" and seen["weight_layout"] == "OHWI"
    assert seen["x"].flags.c_contiguous and np.shares_memory(seen["x"], x.numpy())
    assert seen["weight"].flags.c_contiguous and np.shares_memory(seen["weight"], w.numpy())
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, F.conv2d(x, w, padding=1), rtol=1e-5, atol=1e-5)


def test_unbatched_input():
    x = torch.randn(3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    y = nct.conv2d(x, w, padding="same")
    torch.testing.assert_close(y, F.conv2d(x, w, padding="same"))
    y.sum().backward()
    assert x.grad.shape == x.shape


# --- the nn.Module ------------------------------------------------------------------------
MODULE_CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=(3, 2), padding="same", dilation=(1, 2)),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="valid", groups=4),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, groups=2, padding_mode="reflect"),
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=(1, 2), stride=2, padding_mode="replicate"),
    dict(in_channels=4, out_channels=6, kernel_size=4, padding="same", padding_mode="circular"),
]


@pytest.mark.parametrize("cfg", MODULE_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()
                                                                     if k not in ("in_channels", "out_channels")))
def test_module_is_drop_in(cfg):
    torch.manual_seed(0)
    ours = nct.Conv2d(**cfg, dtype=torch.float64)
    ref = torch.nn.Conv2d(**cfg, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=0, atol=1e-12)
    g = torch.randn_like(yb)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=1e-12)
    for pa, pb in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=1e-11)


def test_module_runs_through_numbaconv(monkeypatch):
    calls = []
    real = numbaconv.conv2d_backward
    monkeypatch.setattr(numbaconv, "conv2d_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = nct.Conv2d(3, 4, 3, padding=1)
    m(torch.randn(1, 3, 5, 5)).sum().backward()
    assert calls, "backward did not go through numbaconv"


def test_module_falls_back_to_torch_for_unsupported_dtype():
    m = nct.Conv2d(3, 4, 3, padding=1).to(torch.bfloat16)
    ref = torch.nn.Conv2d(3, 4, 3, padding=1).to(torch.bfloat16)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 6, 6, dtype=torch.bfloat16)
    assert torch.equal(m(x), ref(x))


# --- training ----------------------------------------------------------------------------------
def make_cnn(conv_cls, dtype):
    torch.manual_seed(1234)
    return torch.nn.Sequential(
        conv_cls(3, 8, 3, padding=1, dtype=dtype), torch.nn.ReLU(),
        conv_cls(8, 16, 3, stride=2, padding=1, dtype=dtype), torch.nn.ReLU(),
        conv_cls(16, 16, 3, padding="same", groups=4, padding_mode="reflect", dtype=dtype), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 5, dtype=dtype),
    )


def train(model, data, steps=20, channels_last=False):
    x, labels = data
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        batch = slice((step % 4) * 8, (step % 4) * 8 + 8)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[batch]), labels[batch])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return np.array(losses)


@pytest.mark.parametrize("dtype,channels_last", [(torch.float64, False), (torch.float64, True),
                                                 (torch.float32, False)],
                         ids=["f64", "f64_channels_last", "f32"])
def test_small_cnn_trains_like_torch(dtype, channels_last):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(32, 3, 12, 12, generator=gen, dtype=dtype)
    labels = torch.randint(0, 5, (32,), generator=gen)
    ours = make_cnn(nct.Conv2d, dtype)
    ref = make_cnn(torch.nn.Conv2d, dtype)
    ref.load_state_dict(ours.state_dict())  # same initial weights (the seed gives them too)
    la = train(ours, (x, labels), channels_last=channels_last)
    lb = train(ref, (x, labels), channels_last=channels_last)
    assert la[-1] < la[0]  # it learns
    if dtype == torch.float64:
        np.testing.assert_allclose(la, lb, rtol=1e-9, atol=0)
    else:
        # float32: both sides round differently (summation order of the reductions, ~1e-6
        # relative per op); 20 SGD steps with momentum amplify that mildly.  The float64 run
        # above pins the arithmetic; here we check the curves agree to ~1e-3 relative.
        np.testing.assert_allclose(la, lb, rtol=2e-3, atol=0)
    for pa, pb in zip(ours.parameters(), ref.parameters()):
        tol = 1e-9 if dtype == torch.float64 else 2e-3
        torch.testing.assert_close(pa, pb, rtol=tol, atol=tol)


def test_module_deepcopy_and_state_dict_roundtrip():
    m = nct.Conv2d(2, 3, 3)
    m2 = copy.deepcopy(m)
    assert isinstance(m2, nct.Conv2d) and isinstance(m2, torch.nn.Conv2d)
    ref = torch.nn.Conv2d(2, 3, 3)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(m2(x), ref(x), rtol=1e-5, atol=1e-6)
