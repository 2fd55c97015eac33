"""The kernels really run on several threads (not judged by speed): per-thread CPU time from /proc."""

import os
import sys
import time

import numpy as np
import pytest

import numbaconv
from numbaconv.registry import REGISTRY

HOST_ALGORITHMS = [name for name in numbaconv.algorithms() if REGISTRY[name].host]


def thread_cpu_ticks():
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[tid] = int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return ticks


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.cpu_count() < 2, reason="needs Linux /proc and 2 cores")
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("algo", HOST_ALGORITHMS)
def test_batch1_uses_several_threads(algo, layout):
    import numba
    numba.set_num_threads(2)
    shape = (1, 32, 48, 48) if layout == "NCHW" else (1, 48, 48, 32)
    wshape = (32, 32, 3, 3) if layout == "NCHW" else (3, 3, 32, 32)
    x = np.ones(shape, np.float32)
    w = np.ones(wshape, np.float32)
    numbaconv.conv2d(x, w, padding=1, layout=layout, algorithm=algo)  # compile outside the window
    before = thread_cpu_ticks()
    start = time.perf_counter()
    while time.perf_counter() - start < 1.0:
        numbaconv.conv2d(x, w, padding=1, layout=layout, algorithm=algo)
    after = thread_cpu_ticks()
    used = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
    assert used[0] > 0
    # the second-busiest thread did a real share of the work
    assert used[1] >= 0.25 * used[0], f"per-thread CPU ticks {used[:4]}: ran on one thread"
