"""Where a converted model's convolutions lose to onnxruntime's: each layer's launch timed
inside its ConvChain program (its real place in the model: weights and activations as the
layers before left the caches), the same launch repeated alone on a copy of its inputs
(everything in cache), and onnxruntime's own per-node time for the same layer (its
profiler's kernel time, NCHW, the model exported as ``numbaconv bench --models`` does);
per layer with ``--layers``, else summed by kernel shape.

    python scripts/chain_layers.py [MODEL] [--batch 1] [--calls 30] [--layers]

onnxruntime's profile is written to a temporary directory and deleted.  Its node list is
matched to the model's convolutions by order (both follow the graph); a model whose export
fuses or reorders convolutions differently prints no onnxruntime column.
"""
import argparse
import collections
import json
import os
import statistics
import tempfile
import time

import torch

import numbaconv.torch as nt
from numbaconv.bench import models


def onnxruntime_layers(model, x, calls):
    """Median kernel time (us) of each Conv / FusedConv node, in graph order, or None."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        sess = models._onnxruntime_inference_session(model, x, torch.get_num_threads(),
                                                     profile_prefix=os.path.join(tmp, "ort"))
        feed = {sess.get_inputs()[0].name: x.numpy()}
        for _ in range(calls + 3):
            sess.run(None, feed)
        with open(sess.end_profiling()) as fh:
            events = json.load(fh)
    times, order = collections.defaultdict(list), []
    for e in events:
        if (e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                and e["args"].get("op_name") in ("Conv", "FusedConv")):
            name = e["name"][:-len("_kernel_time")]
            if name not in times:
                order.append(name)
            times[name].append(e["dur"])
    return [statistics.median(times[n][-calls:]) for n in order]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="mobilenet_v2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--layers", action="store_true", help="one line per layer")
    args = ap.parse_args()
    models.steady_allocator()
    torch.set_num_threads(2)
    model = models.build(args.model)
    x = torch.randn(args.batch, 3, 224, 224)
    conv = nt.convert(model)
    with torch.no_grad():
        conv(x)
        conv(x)
    layers = [m for m in conv.modules() if isinstance(m, nt.FusedConv2d)]
    chained, inputs, runs = collections.defaultdict(list), {}, {}

    def timed(run, i):
        def launch(*a):
            inputs[i] = [None if v is None else v.copy() for v in a]
            t = time.perf_counter()
            run(*a)
            chained[i].append(time.perf_counter() - t)
        return launch
    for i, m in enumerate(layers):
        if m._fast is not None:
            runs[i] = m._fast.run
            m._fast = m._fast._replace(run=timed(m._fast.run, i))
    for c in conv.modules():
        if isinstance(c, nt.ConvChain):
            c._programs.clear()  # (remade with the timed launches)
    with torch.no_grad():
        for _ in range(3):
            conv(x)
        chained.clear()
        for _ in range(args.calls):
            conv(x)
    alone = {}
    for i, run in runs.items():
        ts = []
        for _ in range(args.calls + 10):
            t = time.perf_counter()
            run(*inputs[i])
            ts.append(time.perf_counter() - t)
        alone[i] = statistics.median(ts[10:])
    time.sleep(0.5)
    ort_us = onnxruntime_layers(model, x, args.calls)
    if ort_us is not None and len(ort_us) != len(layers):
        print(f"(onnxruntime has {len(ort_us)} Conv nodes for {len(layers)} layers: not compared)")
        ort_us = None
    print(f"{args.model} batch {args.batch}, NCHW, {torch.get_num_threads()} threads; us per layer "
          f"(median of {args.calls}): in the chain / alone / onnxruntime's node")
    sums = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for i, m in enumerate(layers):
        if i not in runs:
            continue
        k, c, r, s = m.weight.shape
        g = m.geometry
        stride = g["stride"][0] if isinstance(g["stride"], tuple) else g["stride"]
        shape = f"{r}x{s}{' dw' if g['groups'] > 1 else ''} s{stride} @{tuple(inputs[i][0].shape)[-1]}"
        ch, al = statistics.median(chained[i]) * 1e6, alone[i] * 1e6
        o = ort_us[i] if ort_us else float("nan")
        for key in (shape, "all"):
            t = sums[key]
            t[0], t[1], t[2], t[3] = t[0] + ch, t[1] + al, t[2] + o, t[3] + 1
        if args.layers:
            print(f"{i:3d} {c * (g['groups'] if g['groups'] > 1 else 1):5d} -> {k:5d} {shape:18s} "
                  f"{ch:8.1f} {al:8.1f} {o:8.1f}   chain/ort {ch / o:5.2f}")
    for key, (ch, al, o, n) in sorted(sums.items(), key=lambda kv: -kv[1][0]):
        print(f"{key:20s} n={n:3d}  {ch / 1e3:7.2f} {al / 1e3:7.2f} {o / 1e3:7.2f} ms   chain/alone "
              f"{ch / al:4.2f}  chain/ort {ch / o:4.2f}")


if __name__ == "__main__":
    main()
