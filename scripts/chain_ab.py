"""A converted model with its ConvChains (the layers' launches as one program) against the same
model whose fused layers run as modules (the path before chains), in one process: blocks of
calls alternating between the two, so the shared machine's drift hits both; onnxruntime
(NCHW) in its own blocks, each followed by a pause (its threads spin for a while after a
run and slowed whatever ran next by up to 2x on Zen 3).

    python scripts/chain_ab.py [MODEL] [--batch 1] [--channels-last] [--blocks 8] [--calls 40]
"""
import argparse
import statistics
import sys
import time

import numpy as np
import torch

import numbaconv.torch as nt
from numbaconv.bench import models

_convert = sys.modules["numbaconv.torch.convert"]  # (the package's ``convert`` is the function)


def converted(model, chains):
    """``nt.convert(model)``, with or without the chain pass."""
    if chains:
        return nt.convert(model)
    real = _convert._chain
    _convert._chain = lambda gm: None
    try:
        return nt.convert(model)
    finally:
        _convert._chain = real


def block_ms(fn, calls):
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="mobilenet_v2", choices=models.MODELS)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    models.steady_allocator()
    torch.set_num_threads(args.threads)
    model = models.build(args.model)
    x = torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ort = models._onnxruntime_session(model, x, args.threads)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    runs = {"chains": converted(model, True).to(memory_format=fmt),
            "modules": converted(model, False).to(memory_format=fmt)}
    chains = [m for m in runs["chains"].modules() if isinstance(m, nt.ConvChain)]
    with torch.no_grad():
        want = model(x)
        for name, m in runs.items():
            for _ in range(3):
                got = m(x)
            err = float((got - want).abs().max() / want.abs().max())
            assert err < 1e-4, (name, err)
        assert all(c._programs and all(p is not _convert._no_program for p in c._programs.values()) for c in chains)
        times = {name: [] for name in (*runs, "onnxruntime")}
        for _ in range(args.blocks):
            for name, m in runs.items():
                times[name].append(block_ms(lambda: m(x), args.calls))
            times["onnxruntime"].append(block_ms(ort, args.calls))
            time.sleep(0.05)
    print(f"{args.model} batch {args.batch} {'channels_last' if args.channels_last else 'NCHW'}, "
          f"{args.threads} threads, {len(chains)} chains of {[len(c.layers) for c in chains]} layers; "
          f"median ms per block of {args.calls} calls:")
    for name, t in times.items():
        print(f"  {name:12s} " + " ".join(f"{v:6.2f}" for v in t) + f"   median {np.median(t):6.2f}")
    ratio = [m / c for m, c in zip(times["modules"], times["chains"])]
    print(f"  modules / chains per block: {min(ratio):.2f}-{max(ratio):.2f} (median {np.median(ratio):.2f})")


if __name__ == "__main__":
    main()
