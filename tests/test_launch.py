"""The shared parallel loop (``numbaconv.cpu._launch``): every job once, on several threads,
and kernels that use it load from Numba's on-disk cache (nothing compiles in a new process)."""

import json
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

from numbaconv.cpu._launch import Task


@numba.njit(nogil=True)
def _count(lo, hi, hits, scale):
    for j in range(lo, hi):
        hits[j] += scale


@numba.njit(nogil=True)
def _who(lo, hi, ids, spin):
    acc = 0.0
    for _ in range(spin):  # long enough that one thread cannot take every part
        acc += 1e-9
    for j in range(lo, hi):
        ids[j] = numba.get_thread_id() + (acc < 0)


_COUNT = Task(_count)
_WHO = Task(_who)


def _run_count(hits, scale, jobs):
    _COUNT(jobs, hits, scale)


def _run_who(ids, spin):
    _WHO(ids.size, ids, spin)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("jobs", [0, 1, 2, 3, 7, 100])
def test_every_job_runs_once(jobs, threads):
    saved = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        hits = np.zeros(jobs + 5, np.int64)
        _run_count(hits, 3, jobs)
        assert hits[:jobs].tolist() == [3] * jobs
        assert hits[jobs:].tolist() == [0] * 5  # nothing past the job range
    finally:
        numba.set_num_threads(saved)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_parts_run_on_different_threads():
    numba.set_num_threads(2)
    ids = np.full(2, -1, np.int64)
    _run_who(ids, 20_000_000)
    assert len(set(ids.tolist())) == 2, ids


CODE = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np
    from numba.core.event import install_recorder
    import numbaconv
    warnings.simplefilter("always")
    layers = [  # (x NCHW, w OIHW, stride, padding, algorithm)
        ((1, 16, 10, 10), (16, 16, 3, 3), 1, 1, "tiled"),
        ((1, 16, 10, 10), (16, 16, 3, 3), 1, 1, "winograd"),
        ((1, 16, 10, 10), (32, 16, 1, 1), 1, 0, "im2col"),
        ((1, 16, 10, 10), (32, 16, 3, 3), 2, 1, "im2col"),
        ((1, 256, 6, 6), (512, 256, 3, 3), 1, 1, "auto"),  # deep NCHW: numbaconv.cpu.dot
    ]
    with warnings.catch_warnings(record=True) as caught, install_recorder("numba:compile") as rec:
        for xs, ws, stride, pad, algorithm in layers:
            for layout in ("NCHW", "NHWC"):
                x = np.ones(xs, np.float32)
                if layout == "NHWC":
                    x = numbaconv.convert_layout(x, "NCHW", "NHWC")
                numbaconv.conv2d(x, np.ones(ws, np.float32), stride=stride, padding=pad, layout=layout,
                                 weight_layout="OIHW", algorithm=algorithm)
    compiled = sorted({ev.data["dispatcher"].py_func.__qualname__ for _, ev in rec.buffer
                       if ev.is_end and "dispatcher" in ev.data})
    print(json.dumps({"compiled": compiled, "uncached": [str(w.message) for w in caught if "cache" in str(w.message)]}))
""")


def test_launched_kernels_load_from_the_cache(tmp_path):
    """A kernel that embedded a Python object (a dispatcher passed as a value, a ctypes
    pointer) could not be cached and would compile again in every process."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert "launch_address" in runs[0]["compiled"] and "_run_parts" in runs[0]["compiled"]
    assert runs[0]["uncached"] == []
    assert runs[1]["compiled"] == []


STEP = textwrap.dedent("""
    import sys
    import numpy as np
    import numbaconv
    if sys.argv[1] == "dense":
        x, w, kw = np.ones((1, 8, 10, 10), np.float32), np.ones((8, 8, 3, 3), np.float32), {"algorithm": "tiled"}
    else:  # NHWC depthwise 5x5: nothing on its path starts Numba's threads from Python
        x, w = np.ones((1, 10, 10, 16), np.float32), np.ones((16, 1, 5, 5), np.float32)
        kw = {"groups": 16, "layout": "NHWC", "weight_layout": "OIHW"}
    print(float(numbaconv.conv2d(x, w, padding=w.shape[2] // 2, **kw).sum()))
""")


def test_an_entry_compiled_against_a_cached_launch_starts_the_threads(tmp_path):
    """Process 1 caches ``launch``; process 2 compiles a new kernel's entry against the cached
    ``launch`` (Numba drops the reload hook that starts the threading layer from cached
    libraries); process 3 loads only that entry: it must start the layer itself (it crashed,
    jumping to a null thread-count function, before the entries recorded the hook)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    outs = []
    for step in ("dense", "depthwise", "depthwise"):
        proc = subprocess.run([sys.executable, "-c", STEP, step], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (step, proc.returncode, proc.stderr[-2000:])
        outs.append(float(proc.stdout.strip().splitlines()[-1]))
    assert outs[1] == outs[2] > 0


@pytest.mark.parametrize("algorithm", ["tiled", "winograd", "auto"])
def test_argument_types_that_change_between_calls_get_their_own_task(algorithm):
    """A launch's task is compiled per argument types and found by a key of the arguments
    that can change (input, output, epilogue): a read-only input, then a writable one, then
    an activation, each must run the task compiled for it (a wrong address would crash or
    read the arguments wrongly)."""
    import numbaconv
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 8, 16)).astype(np.float32)  # NHWC, no padding: read in place
    w = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    kw = dict(layout="NHWC", weight_layout="OIHW", algorithm=algorithm)
    expected = numbaconv.conv2d(x, w, **kw)
    ro = x.copy()
    ro.flags.writeable = False
    np.testing.assert_array_equal(numbaconv.conv2d(ro, w, **kw), expected)
    np.testing.assert_array_equal(numbaconv.conv2d(x, w, **kw), expected)
    np.testing.assert_array_equal(numbaconv.conv2d(x, w, activation="relu", **kw), np.maximum(expected, 0))


@numba.njit(nogil=True)
def _fail_at(lo, hi, hits, bad):
    for j in range(lo, hi):
        if j == bad:
            raise ValueError("bad job")
        hits[j] = 1


_FAIL = Task(_fail_at)


def test_a_task_that_raises_makes_the_launch_raise():
    """Kernels raise only under NUMBA_BOUNDSCHECK=1 (the extreme-geometry suite relies on it
    to catch out-of-bounds accesses); the trampoline cannot carry the exception, so the
    launch raises after every part is done."""
    hits = np.zeros(8, np.int64)
    with pytest.raises(IndexError, match="task raised"):
        _FAIL(8, hits, 5)
    hits[:] = 0
    _FAIL(8, hits, -1)  # nothing left over from the failed launch
    assert hits.tolist() == [1] * 8


BOUNDS = textwrap.dedent("""
    import numba, numpy as np
    from numbaconv.cpu._launch import Task

    @numba.njit(nogil=True)
    def past_the_end(lo, hi, a):
        for j in range(lo, hi):
            a[j + 1] = 1.0

    try:
        Task(past_the_end)(4, np.zeros(4))
    except IndexError as e:
        print("IndexError", e)
""")


def test_an_out_of_bounds_index_under_boundscheck_reaches_the_caller(tmp_path):
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", BOUNDS], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("IndexError"), proc.stdout


# --- kernels for compiled callers only (numbaconv.cpu._jit.NO_WRAPPERS) -------------------------
def test_jit_kernels_compile_no_python_wrapper_yet_run_from_python():
    """``jit`` compiles the kernel alone (no CPython / C wrapper: a third of a small kernel's
    compile); a call from Python (tests, debugging) must run a twin with a wrapper, not jump to
    the missing wrapper's null address; a task runs it by address."""
    from numbaconv.cpu._jit import Compiled, jit

    k = jit(cache=False)(_count.py_func)
    assert isinstance(k, Compiled)
    hits = np.zeros(6, np.int64)
    k(1, 4, hits, 2)  # from Python: the twin
    assert hits.tolist() == [0, 2, 2, 2, 0, 0]
    Task(k)(6, hits, 1)  # by address: the kernel itself
    assert hits.tolist() == [1, 3, 3, 3, 1, 1]
    ir = next(iter(k.overloads.values())).library.get_llvm_str()
    assert "define" in ir and "@cpython." not in ir and "@cfunc." not in ir


def test_package_kernels_run_from_python():
    from numbaconv.cpu import tiled
    from numbaconv.cpu._jit import Compiled

    assert isinstance(tiled._pad_nhwc, Compiled)
    x = np.arange(2 * 3 * 4, dtype=np.float32)  # N=1, H=2, W=3, C=4, padded by one pixel
    of = np.full(4 * 5 * 4, np.nan, np.float32)
    tiled._pad_nhwc(0, 4, x, of, 4, 5, 4, 2, 3, 1, 1, 2, 3, 1, 1, 4)
    want = np.zeros((4, 5, 4), np.float32)
    want[1:3, 1:4] = x.reshape(2, 3, 4)
    np.testing.assert_array_equal(of.reshape(4, 5, 4), want)
