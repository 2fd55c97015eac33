"""The explicit-vector helpers of ``numbaconv.cpu._vec`` that replaced scalar loops (copies,
transpose edges, partial-block stores, depthwise sweeps), each against a NumPy loop of its
definition: every length around the vector width (the masked last step), both dtypes, and
an out-of-range call under ``NUMBA_BOUNDSCHECK=1`` (a subprocess: the flag is read when
Numba compiles)."""

import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from numbaconv.cpu._vec import channel_taps, copy2d, scatter_block, strided_runs, tap_sweep, target_vector_bytes

VB = target_vector_bytes()
DTYPES = [np.float32, np.float64]
LENGTHS = [0, 1, 7, 8, 15, 16, 17, 33]

def _from_python(intrinsic):
    """``intrinsic`` callable from Python (an intrinsic exists only inside compiled code)."""
    @numba.njit(cache=False)
    def call(*args):
        intrinsic(*args)
    return call


_strided = _from_python(strided_runs(VB))
_copy2d = _from_python(copy2d)
_scatter = _from_python(scatter_block)
_taps9, _taps1, _taps0 = (_from_python(channel_taps(t, VB)) for t in (9, 1, 0))
_sweep_pair = _from_python(tap_sweep(tuple((t, 0) for t in range(9)) + ((6, 1), (7, 1), (8, 1)),
                                     (tuple(range(9)), tuple(range(3, 12))), VB))


def _values(rng, n, dtype):
    return rng.standard_normal(n).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("stride", [2, 3])
def test_strided_runs(dtype, n, stride):
    rng = np.random.default_rng(n)
    src = _values(rng, 5 + stride * n + 2, dtype)
    dst = np.full(2 * n + 20, -7.0, dtype)
    expected = dst.copy()
    if stride == 2:
        expected[3:3 + n] = src[5:5 + 2 * n:2]
        expected[n + 9:2 * n + 9] = src[6:6 + 2 * n:2]
    else:
        expected[3:3 + n] = src[5:5 + stride * n:stride]
    _strided(dst, 3, n + 9, src, 5, stride, n)
    np.testing.assert_array_equal(dst, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ni, nj", [(0, 5), (3, 0), (1, 1), (3, 7), (7, 3), (5, 19)])
def test_copy2d_is_a_strided_copy(dtype, ni, nj):
    rng = np.random.default_rng(ni * 31 + nj)
    src = _values(rng, 400, dtype)
    dst = np.zeros(400, dtype)
    expected = dst.copy()
    for i in range(ni):
        for j in range(nj):
            expected[11 + i + j * ni] = src[2 + i * 20 + j]  # (a transpose, as transpose_block's edges)
    _copy2d(src, dst, 2, 20, 1, 11, 1, ni, ni, nj)
    np.testing.assert_array_equal(dst, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("nk, np_", [(0, 3), (5, 0), (1, 1), (17, 3), (32, 7)])
def test_scatter_block(dtype, first, nk, np_):
    rng = np.random.default_rng(nk * 7 + np_)
    vw, os_p = 32, 40
    tmp = _values(rng, 8 * vw, dtype)
    bias = _values(rng, 64, dtype)
    of = _values(rng, 400, dtype)
    expected = of.copy()
    for p in range(np_):
        for v in range(nk):
            o = 9 + p * os_p + v
            expected[o] = tmp[p * vw + v] + (bias[4 + v] if first else expected[o])
    _scatter(of, tmp, 9, os_p, bias, 4, nk, np_, first, vw)
    np.testing.assert_array_equal(of, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
def test_channel_taps(dtype, n):
    rng = np.random.default_rng(n)
    xf, wf, bias = (_values(rng, 12 * (n + 1), dtype) for _ in range(3))
    xs = tuple(int(v) for v in rng.integers(0, 11 * (n + 1) - n, 9))
    ws = tuple(int(v) for v in rng.integers(0, 11 * (n + 1) - n, 9))
    of = _values(rng, n + 10, dtype)
    # all 9 taps from the bias (tolerance: one FMA chain, not NumPy's separate roundings)
    expected = of.copy()
    acc = bias[3:3 + n].astype(np.float64)
    for t in range(9):
        acc = acc + xf[xs[t]:xs[t] + n].astype(np.float64) * wf[ws[t]:ws[t] + n]
    expected[2:2 + n] = acc
    got = of.copy()
    _taps9(got, 2, xf, xs, wf, ws, bias, 3, True, n)
    np.testing.assert_allclose(got, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)
    assert got[0] == of[0] and got[2 + n] == of[2 + n]  # nothing written outside the run
    # one tap added to what is there
    got = of.copy()
    _taps1(got, 2, xf, xs[:1], wf, ws[:1], bias, 0, False, n)
    expected = of.copy()
    expected[2:2 + n] = of[2:2 + n].astype(np.float64) + xf[xs[0]:xs[0] + n].astype(np.float64) * wf[ws[0]:ws[0] + n]
    np.testing.assert_allclose(got, expected, rtol=1e-6 if dtype == np.float32 else 1e-14, atol=1e-6)
    # the bias alone
    got = of.copy()
    _taps0(got, 2, xf, (), wf, (), bias, 5, True, n)
    expected = of.copy()
    expected[2:2 + n] = bias[5:5 + n]
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
def test_tap_sweep_row_pair(dtype, n):
    """The NCHW phase planes' row-pair sweep: row 1 reads row 0's kernel rows 1-2 and a
    fourth input row (loads 9-11: taps 6-8 shifted by ``extra``)."""
    rng = np.random.default_rng(n)
    wq = n + 3
    buf = _values(rng, 6 * wq + 40, dtype)
    offs = np.array([r * wq + s for r in range(3) for s in range(3)], dtype=np.uintp)
    wf = _values(rng, 30, dtype)
    kk, b, q0 = 9, dtype(0.25), 4
    of = np.zeros(3 * n + 10, dtype)
    _sweep_pair(buf, offs, wq, wf, kk, b, of, 1, n + 2, q0, n)
    expected = np.zeros_like(of)
    for row in range(2):
        for j in range(n):
            q = q0 + j + row * wq
            expected[1 + row * (n + 2) + j] = b + sum(float(wf[kk + t]) * float(buf[q + offs[t]]) for t in range(9))
    np.testing.assert_allclose(of, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-5)


def test_out_of_range_runs_raise_under_boundscheck():
    code = textwrap.dedent("""
        import numba, numpy as np
        from numbaconv.cpu._vec import copy2d, scatter_block, strided_runs, target_vector_bytes
        from numbaconv.cpu._jit import copy_run
        S = strided_runs(target_vector_bytes())

        @numba.njit(cache=False)
        def calls(which, a, b):
            if which == 0:
                S(a, 0, 5, b, 0, 2, 6)        # reads b[0:12] of 10
            elif which == 1:
                copy2d(b, a, 0, 3, 1, 0, 1, 3, 3, 4)  # reads b up to 2*3 + 3 = 9: fine; writes a up to 11 of 10
            elif which == 2:
                scatter_block(a, b, 8, 1, b, 0, 3, 1, True, 1)  # writes a[8:11] of 10
            else:
                copy_run(a, 9, b, 0, 2)       # writes a[9:11] of 10
        for which in range(4):
            try:
                calls(which, np.zeros(10), np.zeros(10))
            except IndexError:
                continue
            raise SystemExit(f"case {which}: no IndexError")
        print("ok")
    """)
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR", "/tmp"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr[-2000:]
