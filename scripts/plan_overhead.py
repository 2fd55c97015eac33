"""Per-call overhead of Conv2dPlan (and conv2d) over the bare Numba kernel call a plan makes,
with the same arguments (captured from one plan call): min over 30 rounds of 200 calls.

    python scripts/plan_overhead.py
"""
import time

import numpy as np

import numbaconv
from numbaconv.cpu import depthwise

ROUNDS, CALLS = 30, 200


def per_call_us(fn):
    t0 = time.perf_counter()
    for _ in range(CALLS):
        fn()
    return (time.perf_counter() - t0) / CALLS * 1e6


def measure(name, x, w, b, module, kernel, **kwargs):
    plan = numbaconv.Conv2dPlan(w, b, **kwargs)
    out = plan(x)
    real, captured = getattr(module, kernel), []
    setattr(module, kernel, lambda *args: captured.append(args) or real(*args))  # looked up per call
    try:
        plan(x, out=out)
    finally:
        setattr(module, kernel, real)
    args = captured[0]
    times = [(per_call_us(lambda: real(*args)), per_call_us(lambda: plan(x, out=out)),
              per_call_us(lambda: numbaconv.conv2d(x, w, b, out=out, **kwargs))) for _ in range(ROUNDS)]
    k, p, c = (min(column) for column in zip(*times))
    print(f"{name}: bare kernel {k:.2f} us, plan {p:.2f} us (+{p - k:.2f}), conv2d {c:.2f} us (+{c - k:.2f})  "
          f"[min of {ROUNDS} x {CALLS} calls]")


rng = np.random.default_rng(0)
for name, c, h in (("mobilenet dw_14 NCHW", 512, 14), ("small dw 32x8x8 NCHW", 32, 8)):
    x = rng.standard_normal((1, c, h, h)).astype(np.float32)
    w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    measure(name, x, w, b, depthwise, "_dw_nchw_phases", padding=1, groups=c)
