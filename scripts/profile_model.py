"""Per-layer-kind time of a torchvision model: torch eager's Conv2d modules against the
FusedConv2d modules of ``numbaconv.torch.convert`` (forward hooks; BatchNorm / activations
are extra modules in torch's column and fused in numbaconv's).  The hooks make each
ConvChain call its layers as modules (a chain's program runs only without hooks), so these
are the layers' times through the module path; ``scripts/chain_ab.py`` times the programs.

    python scripts/profile_model.py efficientnet_b0 [nchw|cl] [batch]
"""
import collections
import sys
import time

import torch

import numbaconv.torch as nt
from numbaconv.bench import models

models.steady_allocator()
torch.set_num_threads(2)
name = sys.argv[1] if len(sys.argv) > 1 else "mobilenet_v2"
fmt = torch.channels_last if len(sys.argv) > 2 and sys.argv[2] == "cl" else torch.contiguous_format
batch = int(sys.argv[3]) if len(sys.argv) > 3 else 1
model = models.build(name).to(memory_format=fmt)
converted = nt.convert(model).to(memory_format=fmt)
x = torch.randn(batch, 3, 224, 224).contiguous(memory_format=fmt)


def kind(mod):
    w = mod.weight
    groups = mod.groups if hasattr(mod, "groups") else mod.geometry["groups"]
    stride = mod.stride if hasattr(mod, "stride") else mod.geometry["stride"]
    stride = stride[0] if isinstance(stride, tuple) else stride
    if groups > 1:
        return f"dw{w.shape[2]}x{w.shape[3]} s{stride}"
    return f"{w.shape[2]}x{w.shape[3]}"


def profile(net, types):
    times, t0, hooks = collections.defaultdict(float), {}, []
    for mod in net.modules():
        if isinstance(mod, types):
            k = kind(mod)
            hooks.append(mod.register_forward_pre_hook(lambda m, i: t0.__setitem__(id(m), time.perf_counter())))
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, k=k: times.__setitem__(k, times[k] + time.perf_counter() - t0[id(m)])))
    with torch.no_grad():
        net(x)
        net(x)
        times.clear()
        for _ in range(3):
            net(x)
    for h in hooks:
        h.remove()
    return {k: v / 3 * 1e3 for k, v in times.items()}


a, b = profile(model, (torch.nn.Conv2d,)), profile(converted, (nt.FusedConv2d,))
for k in sorted(a, key=lambda k: -a[k]):
    print(f"{k:10} torch conv {a[k]:7.2f} ms   numbaconv fused {b.get(k, 0):7.2f} ms")
