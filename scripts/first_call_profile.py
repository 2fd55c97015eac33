"""Where a fresh install's first ``conv2d`` spends its compile time: each function Numba
compiles (``numba:compile`` events, nested ones marked by depth), from an empty cache in this
new process.

    python scripts/first_call_profile.py [algorithm] [NCHW|NHWC]     # default: auto NCHW
"""
import os
import sys
import tempfile
import time

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()  # (before numba is imported: an empty cache)

t0 = time.perf_counter()
import numpy as np  # noqa: E402
from numba.core import event  # noqa: E402

import numbaconv  # noqa: E402

t1 = time.perf_counter()
records = []


class _Listener(event.Listener):
    def __init__(self):
        self.started = {}

    def on_start(self, ev):
        self.started[id(ev.data["dispatcher"]), str(ev.data["args"])] = time.perf_counter()

    def on_end(self, ev):
        f = ev.data["dispatcher"].py_func
        start = self.started.pop((id(ev.data["dispatcher"]), str(ev.data["args"])))
        records.append((time.perf_counter() - start, f"{f.__module__}.{f.__qualname__}", len(self.started)))


event.register("numba:compile", _Listener())
algorithm = sys.argv[1] if len(sys.argv) > 1 else "auto"
layout = sys.argv[2] if len(sys.argv) > 2 else "NCHW"
x = np.random.rand(1, 64, 56, 56).astype(np.float32)
w = np.random.rand(64, 64, 3, 3).astype(np.float32)
if layout == "NHWC":
    x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
t2 = time.perf_counter()
numbaconv.conv2d(x, w, padding=1, algorithm=algorithm, layout=layout, weight_layout="OIHW")
t3 = time.perf_counter()
print(f"1x64x56x56 3x3 {layout} {algorithm}: import {t1 - t0:.2f} s, first call {t3 - t2:.2f} s")
for seconds, name, depth in sorted(records, key=lambda r: -r[0])[:15]:
    print(f"  {seconds:6.2f} s  {'  ' * depth}{name}")
