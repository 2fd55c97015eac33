"""This machine's float32 FMA peak, measured: the denominator of ``numbaconv bench``'s
"% of peak" column (the machines this project runs on differ between sessions, and users'
machines more: an assumed number was wrong by 2x on one of them).

The probe runs independent FMA chains at the target's full vector width on every Numba
thread (enough chains to cover the FMA latency of every core family: 16 registers' worth
on AVX-512, 12 on AVX2), calibrated to ~0.1 s, best of several runs.
"""

import time

import numba
import numpy as np
from numba import prange

from ._vec import fma_chains, target_vector_bytes

__all__ = ["fma_peak_gflops", "CHAINS"]

_W = max(4, target_vector_bytes() // 4)
#: independent accumulators per thread: latency (4-5 cycles) x FMA ports (2), with room
CHAINS = 16 if _W == 16 else 12
_chains = fma_chains(CHAINS, _W)


@numba.njit(cache=True, parallel=True, nogil=True)
def _probe(iters, out):
    for t in prange(out.size):
        out[t] = _chains(iters, np.float32(t + 1))


def fma_peak_gflops(threads=None, seconds=0.1, repeats=5):
    """Measured float32 FMA throughput of ``threads`` Numba threads (default: all), GFLOP/s."""
    threads = numba.get_num_threads() if threads is None else threads
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        out = np.zeros(threads, np.float32)
        iters = 1000
        _probe(iters, out)  # compile / load
        while True:
            t0 = time.perf_counter()
            _probe(iters, out)
            dt = time.perf_counter() - t0
            if dt >= seconds / 4 or iters > 1 << 34:
                break
            iters *= 4
        iters = int(iters * seconds / max(dt, 1e-9))
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            _probe(iters, out)
            best = min(best, time.perf_counter() - t0)
        if not np.isfinite(out).all():
            raise RuntimeError("FMA peak probe produced non-finite values")
        return threads * iters * CHAINS * _W * 2 / best * 1e-9
    finally:
        numba.set_num_threads(old)
