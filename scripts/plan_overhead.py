"""Per-call overhead of Conv2dPlan, conv2d and a converted model's layer module over the
bare launches a plan makes (the native parallel launches with the arguments captured from
one plan call), and torch's own Conv2d module beside them: min over 30 rounds of 200 calls.

    python scripts/plan_overhead.py
"""
import time

import numpy as np
import torch

import numbaconv
import numbaconv.torch as nt
from numbaconv.cpu import _launch

ROUNDS, CALLS = 30, 200


def per_call_us(fn):
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - t0) / CALLS * 1e6


def bare_launches(plan, x, out):
    """The plan's native launches, replayed with the arguments of one call."""
    real, captured = _launch.launch_address, []
    _launch.launch_address = lambda *args: captured.append(args) or real(*args)  # looked up per call
    try:
        plan(x, out=out)
    finally:
        _launch.launch_address = real
    return lambda: [real(*args) for args in captured]


def measure(name, x, w, b, **kwargs):
    plan = numbaconv.Conv2dPlan(w, b, **kwargs)
    out = plan(x)
    bare = bare_launches(plan, x, out)
    conv = torch.nn.Conv2d(w.shape[1] * kwargs.get("groups", 1), w.shape[0], w.shape[2:],
                           padding=kwargs.get("padding", 0), groups=kwargs.get("groups", 1)).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
        conv.bias.copy_(torch.from_numpy(b))
    module = [m for m in nt.convert(torch.nn.Sequential(conv).eval()).modules() if isinstance(m, nt.FusedConv2d)][0]
    xt = torch.from_numpy(x)
    with torch.no_grad():
        rows = [(per_call_us(bare), per_call_us(lambda: plan(x, out=out)),
                 per_call_us(lambda: numbaconv.conv2d(x, w, b, out=out, **kwargs)),
                 per_call_us(lambda: module(xt)), per_call_us(lambda: conv(xt))) for _ in range(ROUNDS)]
    k, p, c, m, t = (min(column) for column in zip(*rows))
    print(f"{name}: bare launches {k:.1f} us, plan {p:.1f} (+{p - k:.1f}), conv2d {c:.1f} (+{c - k:.1f}), "
          f"converted module {m:.1f} (+{m - k:.1f}); torch's Conv2d {t:.1f}  [min of {ROUNDS} x {CALLS} calls]")


torch.set_num_threads(2)
rng = np.random.default_rng(0)
for name, c, k, h, r, groups in (("mobilenet dw_14 NCHW", 512, 512, 14, 3, 512), ("small dw 32x8x8 NCHW", 32, 32, 8, 3, 32),
                                 ("squeeze-excitation 480->20 on 1x1", 480, 20, 1, 1, 1)):
    x = rng.standard_normal((1, c, h, h)).astype(np.float32)
    w = rng.standard_normal((k, c // groups, r, r)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    measure(name, x, w, b, padding=r // 2, groups=groups)
