"""Held-out layer types (the speed issue's item 6), numbaconv vs torch in one process.

    python scripts/bench_heldout.py [--threads 2] [--algorithm auto] [--plan]

Grouped (4, 8, 16 and 32 channels per group), 5x5, Inception's 7x1 / 1x7, strided and dilated
3x3, Inception-v3's 35x35x96 3x3 (Winograd's held-out layer), in NCHW and NHWC (torch as channels_last); best of 5 medians each; prints ms,
GFLOP/s and the speedup over torch (> 1: faster).  ``--plan`` also times each layer through a
``numbaconv.Conv2dPlan`` (weights prepared once, no per-call checks): what a converted model's
layers run, and how much of ``conv2d``'s time is its front door.
"""

import argparse
import statistics

import numpy as np

import numbaconv
from numbaconv.bench import suite as bench

#: name: (N, C, H, W, K, R, S, stride, padding, groups, dilation)
CASES = {
    "grouped_4pg": (1, 128, 56, 56, 128, 3, 3, 1, 1, 32, 1),  # ResNeXt-50 32x4d's first stage
    "grouped_8pg": (1, 152, 28, 28, 152, 3, 3, 1, 1, 19, 1),  # RegNetX-200MF's (group width 8)
    "grouped_16pg": (1, 256, 28, 28, 256, 3, 3, 1, 1, 16, 1),
    "grouped_32pg": (1, 256, 28, 28, 256, 3, 3, 1, 1, 8, 1),
    "5x5": (1, 64, 28, 28, 96, 5, 5, 1, 2, 1, 1),
    "7x1": (1, 128, 17, 17, 128, 7, 1, 1, (3, 0), 1, 1),
    "1x7": (1, 128, 17, 17, 128, 1, 7, 1, (0, 3), 1, 1),
    "strided_3x3": (1, 128, 56, 56, 128, 3, 3, 2, 1, 1, 1),
    "dilated_3x3": (1, 256, 28, 28, 256, 3, 3, 1, 2, 1, 2),
    "inception_35x35x96": (1, 96, 35, 35, 96, 3, 3, 1, 1, 1, 1),  # stride-1 3x3 outside the suite
}


def best_median(fn, rounds=5):
    return min(statistics.median(bench.time_samples(fn, 0.15, 5)) for _ in range(rounds))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=bench.DEFAULT_THREADS)
    ap.add_argument("--algorithm", default="auto")
    ap.add_argument("--plan", action="store_true", help="also time a Conv2dPlan of each layer")
    args = ap.parse_args()
    import torch
    bench.set_threads(args.threads)
    rng = np.random.default_rng(0)
    for name, (n, c, h, w_, k, r, s, stride, pad, groups, dil) in CASES.items():
        x = rng.standard_normal((n, c, h, w_)).astype(np.float32)
        w = rng.standard_normal((k, c // groups, r, s)).astype(np.float32)
        kw = dict(stride=stride, padding=pad, groups=groups, dilation=dil)
        for layout in ("NCHW", "NHWC"):
            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            xa, wa = x, w
            if layout == "NHWC":
                xa, wa = numbaconv.convert_layout(x, "NCHW", "NHWC"), numbaconv.convert_layout(w, "OIHW", "HWIO")
                xt, wt = (t.contiguous(memory_format=torch.channels_last) for t in (xt, wt))
            ours = lambda: numbaconv.conv2d(xa, wa, layout=layout, algorithm=args.algorithm, **kw)  # noqa: E731
            theirs = lambda: torch.nn.functional.conv2d(xt, wt, **kw)  # noqa: E731
            y = ours()
            np.testing.assert_allclose(y if layout == "NCHW" else y.transpose(0, 3, 1, 2), theirs().numpy(),
                                       rtol=1e-3, atol=1e-2)
            a, b = best_median(ours), best_median(theirs)
            flops = 2 * y.size * (c // groups) * r * s
            line = (f"{name:13s} {layout}  numbaconv {a * 1e3:7.3f} ms ({flops / a * 1e-9:4.0f} GF/s)  "
                    f"torch {b * 1e3:7.3f} ms  {b / a:5.2f}x torch")
            if args.plan:
                plan = numbaconv.Conv2dPlan(wa, layout=layout, algorithm=args.algorithm, **kw)
                np.testing.assert_array_equal(plan(xa), y)
                t = best_median(lambda: plan(xa))
                line += f"  plan {t * 1e3:7.3f} ms  {b / t:5.2f}x torch"
            print(line)


if __name__ == "__main__":
    main()
