"""Backward pass (grad input + grad weight + grad bias) of the public suite's 3x3 layers:
numbaconv.conv2d_backward vs torch's convolution backward, float32, same thread count.

    flock /tmp/numbaconv-bench.lock python scripts/bench_backward.py [--threads 2] [--budget 1.0]
                                                                     [--layouts NCHW NHWC] [--shapes ...]
                                                                     [--rounds 1]

torch runs ``aten.convolution_backward`` (the kernel ``loss.backward()`` calls for a conv
layer, asked for all three gradients) on the same arrays: contiguous NCHW tensors, or
``channels_last`` views of the NHWC arrays for NHWC.  Each implementation is timed in its
own block (warm-up call first, then the median of repeats for ``--budget`` seconds), as
``numbaconv bench`` does for the forward pass; ``--rounds N`` alternates the two blocks N times
and keeps each one's best (on a host whose speed drifts within minutes, a single block each
gave the same layer 1.0x in one run and 1.7x in the next).  ratio = numbaconv time / torch
time (< 1: numbaconv is faster).

``--stat min`` reports the minimum wall time instead of the median: on a machine shared with
other jobs, a preempted repeat only ever makes a sample slower, so the minimum is the more
stable estimate of the uncontended time (report which one you used).

``--clock cpu`` reports process CPU time (``time.process_time``, all threads summed) and
takes the minimum instead of the median: with ``--threads 1`` it measures the work itself
and is robust to other jobs sharing the cores (wall time on a loaded 2-core machine is
dominated by preemption of the spinning thread pools).
"""

import argparse
import os
import sys
import time


def _threads_arg(argv, default="2"):
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--threads="):
            return arg.split("=", 1)[1]
    return default


# BLAS (OpenBLAS behind numba's ?gemm) reads its thread count at load time: give it the same
# count as numbaconv and torch, before numpy / scipy are imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", _threads_arg(sys.argv[1:]))

import numpy as np  # noqa: E402

from numbaconv.bench.suite import SUITE, make_inputs, set_threads, time_callable, time_samples  # noqa: E402

SHAPES_3X3 = [name for name, s in SUITE.items() if s.rs == 3]


def runners(shape, layout):
    import torch

    import numbaconv

    x, w = make_inputs(shape, layout)
    ho = shape.out_hw
    rng = np.random.default_rng(1)
    gy_shape = (shape.n, shape.k, ho, ho) if layout == "NCHW" else (shape.n, ho, ho, shape.k)
    gy = rng.standard_normal(gy_shape, dtype=np.float64).astype(np.float32)
    wl = "OIHW" if layout == "NCHW" else "HWIO"
    kwargs = dict(stride=shape.stride, padding=shape.pad, groups=shape.groups, layout=layout, weight_layout=wl)

    def ours():
        return numbaconv.conv2d_backward(gy, x, w, **kwargs)

    if layout == "NCHW":
        xt, wt, gt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(gy)
    else:
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)
        gt = torch.from_numpy(gy).permute(0, 3, 1, 2)
        wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    stride, pad = [shape.stride] * 2, [shape.pad] * 2

    def theirs():
        with torch.no_grad():
            return torch.ops.aten.convolution_backward(gt, xt, wt, [shape.k], stride, pad, [1, 1], False, [0, 0],
                                                       shape.groups, [True, True, True])

    # same answer (float32 rounding) before timing anything
    got = ours()
    exp = theirs()
    to_layout = (lambda t: t.numpy()) if layout == "NCHW" else (lambda t: t.permute(0, 2, 3, 1).numpy())
    w_exp = exp[1].numpy() if layout == "NCHW" else exp[1].permute(2, 3, 1, 0).numpy()
    for a, b in ((got[0], to_layout(exp[0])), (got[1], w_exp), (got[2], exp[2].numpy())):
        scale = max(float(np.abs(b).max()), 1.0)
        assert np.abs(a - b).max() <= 1e-3 * scale, f"{shape.name} {layout}: mismatch vs torch"
    return ours, theirs


def cpu_time(fn, budget_s=0.5, min_repeats=3):
    """Minimum process CPU seconds of ``fn()`` over repeats (warm-up call first)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < budget_s:
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times), len(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per cell")
    parser.add_argument("--layouts", nargs="+", default=["NCHW", "NHWC"])
    parser.add_argument("--shapes", nargs="+", default=SHAPES_3X3)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: median wall time; cpu: minimum process CPU time")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="statistic of the wall-time repeats (--clock wall)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time numbaconv and torch in turn this many times per cell (the budget split "
                             "between them), each keeping its best round: the machine's drift hits both")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    rounds = max(1, args.rounds)
    if args.clock == "cpu":
        timer, stat = cpu_time, "min CPU"
    elif args.stat == "min":
        def timer(fn, budget_s):
            times = time_samples(fn, budget_s, 3, 1000, True)
            return min(times), len(times)
        stat = "min wall"
    else:
        timer, stat = time_callable, "median wall"

    print(f"backward (grad input + weight + bias), float32, {args.threads} threads, {stat} ms")
    print(f"{'shape':<20} {'layout':<6} {'numbaconv':>10} {'torch':>10} {'ratio':>7}")
    ratios = []
    for name in args.shapes:
        shape = SUITE[name]
        for layout in args.layouts:
            ours, theirs = runners(shape, layout)
            t_ours = t_torch = float("inf")
            for _ in range(rounds):
                t_ours = min(t_ours, timer(ours, budget_s=args.budget / rounds)[0])
                t_torch = min(t_torch, timer(theirs, budget_s=args.budget / rounds)[0])
            ratio = t_ours / t_torch
            ratios.append(ratio)
            print(f"{name:<20} {layout:<6} {t_ours * 1e3:10.3f} {t_torch * 1e3:10.3f} {ratio:7.2f}", flush=True)
    geomean = float(np.exp(np.mean(np.log(ratios))))
    print(f"geomean ratio (numbaconv / torch): {geomean:.2f}; worst {max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
