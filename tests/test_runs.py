"""The copy helpers of ``numbaconv.cpu._jit``: ``move_run`` / ``zero_run`` (one memmove /
memset for long runs) and ``copy_run`` / ``fill_run`` (explicit vectors for short ones)."""

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from numbaconv.cpu._jit import copy_run, fill_run, move_run, zero_run


@numba.njit(cache=False)
def _apply(dst, src, d0, s0, n, which):
    if which == 0:
        move_run(dst, d0, src, s0, n)
    elif which == 1:
        zero_run(dst, d0, n)
    elif which == 2:
        copy_run(dst, d0, src, s0, n)
    else:
        fill_run(dst, d0, n, dst.dtype.type(0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d0,s0,n", [(0, 0, 17), (5, 3, 40), (60, 0, 4), (7, 9, 0), (7, 9, -3)])
def test_runs_equal_slice_assignment(dtype, d0, s0, n):
    rng = np.random.default_rng(n + 100)
    src = rng.standard_normal(64).astype(dtype)
    for which in range(4):
        dst = rng.standard_normal(64).astype(dtype)
        want = dst.copy()
        if n > 0:
            want[d0:d0 + n] = src[s0:s0 + n] if which in (0, 2) else 0
        _apply(dst, src, d0, s0, n, which)
        assert np.array_equal(dst, want), which


def test_move_run_handles_overlap_like_memmove():
    a = np.arange(20, dtype=np.float32)
    _apply(a, a, 2, 0, 10, 0)
    assert np.array_equal(a[2:12], np.arange(10, dtype=np.float32))


def test_runs_out_of_bounds_raise_under_boundscheck(tmp_path):
    """Under NUMBA_BOUNDSCHECK=1 (the property suite's mode) a run past either end raises
    IndexError instead of writing out of bounds."""
    code = textwrap.dedent("""
        import numba, numpy as np
        from numbaconv.cpu._jit import move_run, zero_run

        @numba.njit(cache=False)
        def mv(dst, src, d0, s0, n):
            move_run(dst, d0, src, s0, n)

        @numba.njit(cache=False)
        def zr(dst, d0, n):
            zero_run(dst, d0, n)

        a, b = np.zeros(8, np.float32), np.ones(8, np.float32)
        for call in (lambda: mv(a, b, 4, 0, 5), lambda: mv(a, b, 0, 4, 5), lambda: mv(a, b, -1, 0, 2),
                     lambda: zr(a, 6, 3)):
            try:
                call()
            except IndexError:
                continue
            raise SystemExit("no IndexError")
        mv(a, b, 0, 0, 8)
        zr(a, 0, 8)
        print("ok")
    """)
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
