"""What each new kind of layer compiles on a fresh install: an empty Numba cache in this new
process, then one ``conv2d`` per layer below in order (float32, ``auto``), each timed; a
layer whose kernels an earlier one compiled takes ~0 s.  SPEC's compile targets: the first
``conv2d`` <= 3 s with ``import numbaconv``, every further new layer geometry of the same
dtype and layout <= 1 s (the float64 row is a new dtype).

    python scripts/new_layer_compile.py [NCHW|NHWC]
"""
import os
import sys
import tempfile
import time

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()  # (before numba is imported: an empty cache)

t0 = time.perf_counter()
import numpy as np  # noqa: E402

import numbaconv  # noqa: E402

print(f"import numbaconv {time.perf_counter() - t0:.2f} s")
layout = sys.argv[1] if len(sys.argv) > 1 else "NCHW"
#: (name, (N, C, H, K, (R, S), stride, padding, groups, dilation, dtype))
LAYERS = [
    ("3x3 64ch 56x56 (Winograd)", (1, 64, 56, 64, (3, 3), 1, 1, 1, 1, np.float32)),
    ("3x3 s2, K=40 (direct)", (2, 96, 17, 40, (3, 3), 2, 1, 1, 1, np.float32)),
    ("5x5", (1, 48, 13, 80, (5, 5), 1, 2, 1, 1, np.float32)),
    ("7x7 s2 RGB stem", (1, 3, 224, 64, (7, 7), 2, 3, 1, 1, np.float32)),
    ("3x3 512ch 7x7 (F(2x2))", (1, 512, 7, 512, (3, 3), 1, 1, 1, 1, np.float32)),
    ("16 per group (narrow)", (1, 64, 12, 64, (3, 3), 1, 1, 4, 1, np.float32)),
    ("8 per group (packed pairs)", (1, 64, 12, 64, (3, 3), 1, 1, 8, 1, np.float32)),
    ("4 per group (packed fours)", (1, 64, 12, 64, (3, 3), 1, 1, 16, 1, np.float32)),
    ("1x1", (1, 64, 16, 256, (1, 1), 1, 0, 1, 1, np.float32)),
    ("1x1 s2", (1, 64, 16, 128, (1, 1), 2, 0, 1, 1, np.float32)),
    ("depthwise 3x3 32x30", (1, 32, 30, 32, (3, 3), 1, 1, 32, 1, np.float32)),
    ("depthwise 3x3 s2 64x28", (1, 64, 28, 64, (3, 3), 2, 1, 64, 1, np.float32)),
    ("depthwise 3x3 96x56", (1, 96, 56, 96, (3, 3), 1, 1, 96, 1, np.float32)),
    ("depthwise 3x3 s2 144x56", (1, 144, 56, 144, (3, 3), 2, 1, 144, 1, np.float32)),
    ("depthwise 5x5 240x14", (1, 240, 14, 240, (5, 5), 1, 2, 240, 1, np.float32)),
    ("7x1", (1, 128, 17, 128, (7, 1), 1, (3, 0), 1, 1, np.float32)),
    ("3x3 dilation 2", (1, 64, 28, 64, (3, 3), 1, 2, 1, 2, np.float32)),
    ("float64 3x3 (new dtype)", (1, 64, 28, 64, (3, 3), 1, 1, 1, 1, np.float64)),
]
for name, (n, c, h, k, rs, stride, pad, groups, dil, dtype) in LAYERS:
    x = np.zeros((n, c, h, h), dtype)
    w = np.zeros((k, c // groups) + rs, dtype)
    if layout == "NHWC":
        x = numbaconv.convert_layout(x, "NCHW", "NHWC")
    t = time.perf_counter()
    numbaconv.conv2d(x, w, stride=stride, padding=pad, dilation=dil, groups=groups, layout=layout,
                     weight_layout="OIHW")
    print(f"{name:28s} {layout} {time.perf_counter() - t:5.2f} s")
