#!/usr/bin/env python
"""numbaconv's CUDA kernels against cuDNN (FP32, TF32 off) on the public suite, batch 1 and 32.

Run on a machine with an NVIDIA GPU, torch with CUDA and numba-cuda matching the driver::

    pip install -e ".[cuda]"            # or numba-cuda[cu12] / numba-cuda[cu13]
    python scripts/bench_cuda.py        # --json out.json --markdown (README table)

Both sides get the same torch CUDA tensors and run on torch's current stream; times are
CUDA-event medians over repeated launches (after warm-up and compilation), so GPU time
is measured, including gaps when the host cannot keep up.  Columns:

* ``cudnn``: ``torch.nn.functional.conv2d`` with ``cudnn.benchmark = True``, TF32 off;
* ``e2e``: ``numbaconv.conv2d(..., algorithm="cuda")`` end to end (validation, weight
  packing, output allocation and the kernel);
* ``kernel``: the convolution kernel alone (``cuda_conv.plan`` once, then ``launch()``);
* ``% cudnn``: cuDNN time / kernel time (100 % = as fast as cuDNN).

The issue's target: kernel >= 50 % of cuDNN on the ResNet 3x3 layers at batch 32.

``--backward`` times the backward pass instead (grad input + weight + bias):
``torch.ops.aten.convolution_backward`` (cuDNN) against
``numbaconv.cuda.backward.conv2d_backward_cuda`` on the same tensors, with each result's
largest relative difference from cuDNN's.
"""

import argparse
import json
import math
import platform
import statistics
import sys

RESNET_3X3 = ("resnet_res2_3x3", "resnet_res4_3x3", "resnet_res5_3x3")


def _time_ms(torch, fn, repeat, trials=5):
    """Median over ``trials`` of the mean CUDA-event time of ``repeat`` back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeat):
            fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / repeat)
    return statistics.median(times)


def _repeat_for(torch, fn, budget_ms=50.0):
    """Enough back-to-back calls to fill about ``budget_ms`` of GPU time."""
    once = _time_ms(torch, fn, 1, trials=3)
    return max(1, min(1000, int(budget_ms / max(once, 1e-3))))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--layouts", default="NCHW,NHWC")
    parser.add_argument("--shapes", help="comma-separated suite names (default: the whole public suite)")
    parser.add_argument("--kernel", default="auto", help="auto, direct, gemm, gemm64, gemm128")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (for the README)")
    parser.add_argument("--backward", action="store_true", help="time the backward pass instead of the forward")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("no CUDA device visible to torch: nothing to benchmark", file=sys.stderr)
        return 2
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True

    import numbaconv
    from numbaconv.cuda import conv as cuda_conv
    from numbaconv.bench.suite import SUITE

    if "cuda" not in numbaconv.algorithms():
        print("numbaconv's 'cuda' algorithm is not available (numba-cuda installed? driver?)", file=sys.stderr)
        return 2
    from numba import cuda

    device = torch.cuda.get_device_name()
    names = args.shapes.split(",") if args.shapes else list(SUITE)
    batches = [int(b) for b in args.batches.split(",")]
    layouts = args.layouts.split(",")
    print(f"device: {device}; torch {torch.__version__} (cuDNN {torch.backends.cudnn.version()}), "
          f"numba-cuda {getattr(cuda, '__version__', '?')}; float32, TF32 off", flush=True)

    if args.backward:
        return _backward(torch, names, batches, layouts)

    rows = []
    header = (f"{'shape':20s} {'N':>3s} {'layout':6s} {'kernel':8s} {'cudnn ms':>9s} {'e2e ms':>9s} "
              f"{'kernel ms':>9s} {'TFLOP/s':>8s} {'% cudnn':>8s} {'max err':>9s}")
    print(header)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in names:
        shape = SUITE[name]
        for n in batches:
            for layout in layouts:
                c, hw, k, rs, st, pad, groups = shape.c, shape.hw, shape.k, shape.rs, shape.stride, shape.pad, shape.groups
                fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
                x = torch.randn((n, c, hw, hw), device="cuda", generator=gen).to(memory_format=fmt)
                w = torch.randn((k, c // groups, rs, rs), device="cuda", generator=gen).to(memory_format=fmt)
                b = torch.randn((k,), device="cuda", generator=gen)
                # numbaconv sees the same memory: NHWC activations and HWIO weights for channels-last
                x_nc = x.permute(0, 2, 3, 1) if layout == "NHWC" else x
                w_nc = w.permute(2, 3, 1, 0) if layout == "NHWC" else w
                kw = dict(stride=st, padding=pad, groups=groups, layout=layout)

                def cudnn():
                    return F.conv2d(x, w, b, stride=st, padding=pad, groups=groups)

                def e2e():
                    return numbaconv.conv2d(x_nc, w_nc, b, algorithm="cuda", **kw)

                result, out_d, stream, launch, kernel_name = cuda_conv.plan(x_nc, w_nc, b, kernel=args.kernel, **kw)
                ref = cudnn()
                if layout == "NHWC":
                    ref = ref.permute(0, 2, 3, 1)
                launch()
                err = (result - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)

                repeat = _repeat_for(torch, cudnn)
                t_cudnn = _time_ms(torch, cudnn, repeat)
                t_kernel = _time_ms(torch, launch, _repeat_for(torch, launch))
                t_e2e = _time_ms(torch, e2e, _repeat_for(torch, e2e))
                flops = 2 * n * k * (c // groups) * rs * rs * shape.out_hw ** 2
                row = dict(shape=name, n=n, layout=layout, kernel=kernel_name, cudnn_ms=t_cudnn, e2e_ms=t_e2e,
                           kernel_ms=t_kernel, tflops=flops / t_kernel / 1e9, pct_cudnn=100 * t_cudnn / t_kernel,
                           rel_err=err)
                rows.append(row)
                print(f"{name:20s} {n:3d} {layout:6s} {kernel_name:8s} {t_cudnn:9.4f} {t_e2e:9.4f} {t_kernel:9.4f} "
                      f"{row['tflops']:8.2f} {row['pct_cudnn']:7.1f}% {err:9.2e}", flush=True)
                del x, w, b, x_nc, w_nc, result, out_d, ref
                torch.cuda.empty_cache()

    summary = {}
    for layout in layouts:
        sel = [r["pct_cudnn"] for r in rows if r["shape"] in RESNET_3X3 and r["n"] == 32 and r["layout"] == layout]
        if sel:
            summary[layout] = math.exp(sum(math.log(v) for v in sel) / len(sel))
            print(f"ResNet 3x3 layers, batch 32, {layout}: geometric mean {summary[layout]:.1f}% of cuDNN "
                  f"(target >= 50%): " + ", ".join(f"{v:.0f}%" for v in sel))

    if args.markdown:
        print(f"\nDevice: {device}, float32, TF32 off, CUDA-event medians.\n")
        print("| shape | N | layout | kernel | cuDNN ms | numbaconv kernel ms | end-to-end ms | % of cuDNN |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shape']} | {r['n']} | {r['layout']} | {r['kernel']} | {r['cudnn_ms']:.3f} | "
                  f"{r['kernel_ms']:.3f} | {r['e2e_ms']:.3f} | {r['pct_cudnn']:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "python": platform.python_version(),
                       "results": rows, "resnet_3x3_batch32_pct_cudnn": summary}, f, indent=1)
    return 0


def _backward(torch, names, batches, layouts):
    from numbaconv.bench.suite import SUITE
    from numbaconv.cuda.backward import conv2d_backward_cuda

    print(f"{'shape':20s} {'N':>3s} {'layout':6s} {'cudnn ms':>9s} {'ours ms':>9s} {'ours/cudnn':>10s} {'max err':>9s}")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in names:
        shape = SUITE[name]
        for n in batches:
            for layout in layouts:
                c, hw, k, rs, st, pad, groups = shape.c, shape.hw, shape.k, shape.rs, shape.stride, shape.pad, shape.groups
                fmt = torch.channels_last if layout == "NHWC" else torch.contiguous_format
                x = torch.randn((n, c, hw, hw), device="cuda", generator=gen).to(memory_format=fmt)
                w = torch.randn((k, c // groups, rs, rs), device="cuda", generator=gen).to(memory_format=fmt)
                oh = shape.out_hw
                gy = torch.randn((n, k, oh, oh), device="cuda", generator=gen).to(memory_format=fmt)
                nhwc = layout == "NHWC"
                x_nc, w_nc, gy_nc = ((x.permute(0, 2, 3, 1), w.permute(2, 3, 1, 0), gy.permute(0, 2, 3, 1)) if nhwc
                                     else (x, w, gy))

                def cudnn():
                    return torch.ops.aten.convolution_backward(gy, x, w, [k], [st, st], [pad, pad], [1, 1], False,
                                                               [0, 0], groups, [True, True, True])

                def ours():
                    return conv2d_backward_cuda(gy_nc, x_nc, w_nc, stride=st, padding=pad, groups=groups,
                                                layout=layout, weight_layout="HWIO" if nhwc else "OIHW")

                ref, got = cudnn(), ours()
                ref = (ref[0].permute(0, 2, 3, 1), ref[1].permute(2, 3, 1, 0), ref[2]) if nhwc else ref
                err = max((a - b).abs().max().item() / max(b.abs().max().item(), 1e-30) for a, b in zip(got, ref))
                t_cudnn = _time_ms(torch, cudnn, _repeat_for(torch, cudnn))
                t_ours = _time_ms(torch, ours, _repeat_for(torch, ours))
                print(f"{name:20s} {n:3d} {layout:6s} {t_cudnn:9.4f} {t_ours:9.4f} {t_ours / t_cudnn:10.2f} {err:9.2e}",
                      flush=True)
                del x, w, gy, x_nc, w_nc, gy_nc, ref, got
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
