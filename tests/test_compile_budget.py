"""Specialisation must not creep: what compiles for a new layer is only what its kernel family
needs, and a family compiles once per dtype and layout.

A fresh process with an empty Numba cache runs layer after layer (several channel counts,
sizes, strides, kernel sizes, groups; both layouts) and counts the functions Numba compiles
for each (``numba:compile`` events).  The first layer of a family pays for the family; every
later layer of a family already compiled must compile nothing -- a kernel specialised on a
value that differs between layers (a pixel block, a channel count) would show up here.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

#: (family, (N, C, H, K, R, stride, padding, groups)): first layers of each family first
LAYERS = [
    ("dense", (2, 96, 17, 40, 3, 2, 1, 1)),         # K not a multiple of V: packed weights in both layouts
    ("dense", (1, 48, 13, 80, 5, 1, 2, 1)),         # 5x5, stride 1; NHWC: HWIO weights read in place
    ("dense", (1, 3, 40, 64, 7, 2, 3, 1)),          # 7x7 stem
    ("dense", (1, 3, 20, 64, 3, 1, 1, 1)),          # 3x3 on RGB: too few channels for Winograd
    ("winograd", (1, 64, 20, 64, 3, 1, 1, 1)),      # stride-1 3x3: F(4x4)
    ("winograd", (1, 128, 14, 128, 3, 1, 1, 1)),    # other channels and size
    ("winograd2", (1, 512, 7, 512, 3, 1, 1, 1)),    # F(2x2): its own tile transforms, nothing else
    ("winograd2", (1, 256, 8, 256, 3, 1, 1, 1)),   # 16 F(2x2) tiles: two GEMM blocks on every target (6x6's 9
                                                    # are too few for AVX2's blocks of 6: tiled's dot kernel)
    ("winograd", (1, 64, 12, 64, 3, 1, 1, 2)),      # grouped, 32 per group
    ("narrow", (1, 64, 12, 64, 3, 1, 1, 4)),        # 16 per group: AVX-512's narrow blocks (AVX2: Winograd)
    ("narrow", (1, 32, 10, 16, 3, 2, 1, 1)),        # 16 output channels, stride 2
    ("packed2", (1, 64, 12, 64, 3, 1, 1, 8)),       # 8 per group: pairs of groups per register (AVX2: the narrow block)
    ("packed2", (1, 96, 9, 96, 3, 2, 1, 12)),
    ("packed4", (1, 64, 12, 64, 3, 1, 1, 16)),      # 4 per group: sets of 4 (AVX2: sets of 2)
    ("packed4", (1, 128, 10, 128, 3, 1, 1, 32)),
    ("pointwise", (1, 64, 16, 256, 1, 1, 0, 1)),
    ("pointwise", (1, 256, 9, 96, 1, 1, 0, 1)),
    ("depthwise", (1, 32, 30, 32, 3, 1, 1, 32)),
    ("depthwise", (1, 96, 14, 96, 3, 1, 1, 96)),
    ("depthwise_s2", (1, 64, 28, 64, 3, 2, 1, 64)),  # column stride 2: NHWC's own block (NCHW: nothing)
    ("depthwise_s2", (1, 48, 20, 48, 3, 2, 1, 48)),
]
#: functions the first layer of a family may compile (tiled's driver, its micro-kernels,
#: padding and packing helpers, Numba's own small overloads; Winograd's driver and its
#: NCHW transposes on top of tiled's padding; F(2x2) only its input and output transforms);
#: measured, with some room
FIRST = {"dense": 20, "winograd": 10, "winograd2": 3, "depthwise_s2": 3, "pointwise": 8, "depthwise": 12, "narrow": 8, "packed2": 10, "packed4": 12}

#: kernels specialised on purpose, by a ``None``-typed flag that prunes the other variant: how
#: many signatures each may compile in one layout (NHWC depthwise: one per column stride)
VARIANTS = {"numbaconv.cpu.depthwise._dw_nhwc_ring_rows": 2}

CODE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from numba.core.event import install_recorder
    import numbaconv
    layout, layers = sys.argv[1], json.loads(sys.argv[2])
    counts, sigs = [], []
    for family, (n, c, h, k, r, stride, pad, groups) in layers:
        x = np.zeros((n, c, h, h), np.float32)
        w = np.zeros((k, c // groups, r, r), np.float32)
        if layout == "NHWC":
            x = numbaconv.convert_layout(x, "NCHW", "NHWC")
        with install_recorder("numba:compile") as rec:
            numbaconv.conv2d(x, w, stride=stride, padding=pad, groups=groups, layout=layout, weight_layout="OIHW")
        counts.append(sorted({ev.data["dispatcher"].py_func.__qualname__
                              for _, ev in rec.buffer if ev.is_end and "dispatcher" in ev.data}))
        sigs.extend(f"{ev.data['dispatcher'].py_func.__module__}.{ev.data['dispatcher'].py_func.__qualname__}"
                    f" {ev.data['args']}" for _, ev in rec.buffer if ev.is_end and "dispatcher" in ev.data)
    print(json.dumps(sigs))
    print(json.dumps(counts))
""")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_each_kernel_family_compiles_once(layout, tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", CODE, layout, json.dumps(LAYERS)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = json.loads(proc.stdout.strip().splitlines()[-1])
    # one dtype and layout: a kernel compiled for a second signature is specialised on
    # something that varies between layers (a literal argument cost Winograd 0.35 s); only
    # the launch entry has one signature per task's argument types
    sigs = json.loads(proc.stdout.strip().splitlines()[-2])
    by_name = {}
    for s in sigs:
        name = s.split(" ", 1)[0]
        if name.startswith("numbaconv.") and not name.endswith("launch_address"):
            by_name.setdefault(name, []).append(s)
    assert not {k: v for k, v in by_name.items() if len(v) > VARIANTS.get(k, 1)}
    seen = set()
    for (family, layer), names in zip(LAYERS, compiled):
        if family in seen:
            assert names == [], f"{layout} {family} layer {layer} compiled again: {names}"
        else:
            assert len(names) <= FIRST[family], f"{layout} {family}: {len(names)} functions: {names}"
            seen.add(family)
