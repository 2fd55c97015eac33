"""Per-call overhead of numbaconv.torch on a small layer (1x16x8x8, 3x3, padding 1, float32):
``numbaconv.torch.conv2d`` (eager: the operator's kernels through an autograd.Function;
traced: the ``numbaconv::conv2d`` operator) against the ``torch.autograd.Function`` bridge it
replaced (copied here as it was) and the bare NumPy call; also the operator called through
torch's dispatcher.  Medians of alternating rounds, in microseconds.

    python scripts/torch_overhead.py [rounds]
"""

import statistics
import sys
import time

import torch
from torch.autograd.function import once_differentiable

import numbaconv
import numbaconv.torch as nct
from numbaconv.torch import ops

torch.set_num_threads(2)


class OldFunction(torch.autograd.Function):
    """The bridge before the custom operators (numbaconv.torch's Conv2dFunction up to 5bdf0ce),
    as it was, CPU path."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry):
        ctx.geometry = geometry
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        layout = "NHWC" if ops.is_channels_last(x) else "NCHW"
        xa = ops.act_to_numpy(x, layout)
        weight_layout = ops.weight_layout_of(weight, layout)
        wa = ops.weight_to_numpy(weight, weight_layout)
        ba = None if bias is None else bias.detach().numpy()
        ctx.layouts = (layout, weight_layout)
        y = numbaconv.conv2d(xa, wa, ba, layout=layout, weight_layout=weight_layout, **geometry)
        return ops.act_from_numpy(y, layout)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        layout, weight_layout = ctx.layouts
        xa = ops.act_to_numpy(x, layout)
        wa = ops.weight_to_numpy(weight, weight_layout)
        gy = ops.act_to_numpy(grad_output, layout)
        dx, dw, db = numbaconv.conv2d_backward(gy, xa, wa, layout=layout, weight_layout=weight_layout,
                                               input_grad=need_x, weight_grad=need_w,
                                               bias_grad=need_b and ctx.has_bias, **ctx.geometry)
        return (None if dx is None else ops.act_from_numpy(dx, layout),
                None if dw is None else ops.weight_from_numpy(dw, weight_layout),
                None if db is None else torch.from_numpy(db),
                None)


def old_conv2d(x, w, b):
    return OldFunction.apply(x, w, b, dict(stride=1, padding=1, dilation=1, groups=1, padding_mode="zeros"))


def per_call_us(fn, calls=2000):
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main(rounds=7):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=gen)
    w = torch.randn(16, 16, 3, 3, generator=gen)
    b = torch.randn(16, generator=gen)
    xn, wn, bn = x.numpy(), w.numpy(), b.numpy()
    module = nct.Conv2d(16, 16, 3, padding=1)
    xg, wg, bg = (t.clone().requires_grad_(True) for t in (x, w, b))
    cases = {
        "numpy numbaconv.conv2d": lambda: numbaconv.conv2d(xn, wn, bn, padding=1),
        "forward, no grad: autograd.Function (old)": lambda: old_conv2d(x, w, b),
        "forward, no grad: nct.conv2d": lambda: nct.conv2d(x, w, b, padding=1),
        "forward, no grad: torch.ops.numbaconv.conv2d": lambda: ops.conv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1,
                                                                           "zeros"),
        "forward, no grad: nct.Conv2d module": lambda: module(x),
        "forward+backward: autograd.Function (old)": lambda: old_conv2d(xg, wg, bg).sum().backward(),
        "forward+backward: nct.conv2d": lambda: nct.conv2d(xg, wg, bg, padding=1).sum().backward(),
    }
    for fn in cases.values():  # compile and warm
        fn()
    times = {k: [] for k in cases}
    for _ in range(rounds):
        for k, fn in cases.items():
            times[k].append(per_call_us(fn, 300 if "backward" in k else 2000))
    print(f"1x16x8x8, 3x3, padding 1, float32, torch {torch.__version__}; median of {rounds} rounds (min-max)")
    for k, v in times.items():
        print(f"  {k:45s} {statistics.median(v):7.1f} us  ({min(v):.1f}-{max(v):.1f})")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
