"""airspeed velocity (asv) benchmarks for numbaconv.

Parametrised over algorithm x layout x SPEC.md's public suite, from the one table in
:mod:`numbaconv.bench.suite` (shared with ``numbaconv bench`` and the tests):

* ``Conv2d.time_conv2d`` -- one ``conv2d`` call; ``setup`` builds the arrays and calls once,
  so JIT compilation (or loading from Numba's cache) is never timed;
* ``Throughput.track_gflops`` -- GFLOP/s (median of adaptive repeats, in-process);
* ``SpeedupVsTorch.track_speedup_vs_torch`` -- torch's time / numbaconv's time, both measured
  in this process with the same thread count (a ratio that survives machine drift);
* ``SpeedupVsOnnxruntime.track_speedup_vs_onnxruntime`` -- the same against onnxruntime (MLAS),
  NCHW only (one ONNX ``Conv`` node);
* ``Backward.time_conv2d_backward`` / ``track_backward_ratio_vs_torch`` -- the training
  step: ``conv2d_backward`` (grad input + weight + bias), and its time over torch's
  ``convolution_backward`` on the same arrays (< 1: numbaconv is faster);
* ``Im2colMemory.peakmem_im2col_large`` -- peak memory of im2col on a problem whose full
  im2col matrix is 144 MiB, far over the 32 MiB workspace budget;
* ``FirstCall.timeraw_import_and_first_call`` -- ``import numbaconv`` + the first call in a
  fresh interpreter, with a cold (empty) and a warm Numba cache.

numbaconv and torch run with 2 threads (``THREADS``).  ``tests/test_asv_benchmarks.py``
runs every method once on tiny shapes, so these benchmarks cannot rot.
"""

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path


def _load_bench():
    """The shared table, from this checkout (asv runs these files against older commits).

    asv discovers the benchmarks once and then runs them against every commit of a range,
    so parameters must not depend on the installed commit.  Use the installed
    ``numbaconv.bench.suite`` when it *is* this checkout's file (an editable install, the tests);
    otherwise load this checkout's copy, which needs only ``numbaconv.conv2d`` and
    ``numbaconv.algorithms()`` from the installed commit (so commits older than
    ``numbaconv/bench/suite.py`` are benchmarked too).
    """
    path = Path(__file__).resolve().parents[1] / "numbaconv" / "bench" / "suite.py"
    try:
        from numbaconv.bench import suite as bench
        if not path.exists() or Path(bench.__file__).resolve() == path:
            return bench
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("_numbaconv_bench_checkout", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()

#: numbaconv and torch alike.
THREADS = 2
#: seconds spent per implementation by the ``track_`` benchmarks (tests lower it)
TRACK_BUDGET_S = 0.3

#: A fixed list, not ``numbaconv.algorithms()`` of the installed commit: asv needs the same
#: parameters at every commit (an algorithm a commit lacks is skipped there, shown as n/a).
#: ``tests/test_asv_benchmarks.py`` fails when a registered algorithm is missing here.
ALGORITHMS = ["naive", "im2col", "tiled", "winograd", "auto"] + (["cuda"] if bench._real_gpu() else [])
LAYOUTS = list(bench.LAYOUTS)
SHAPES = list(bench.SUITE)
PARAMS = (ALGORITHMS, LAYOUTS, SHAPES)
PARAM_NAMES = ("algorithm", "layout", "shape")


def _set_threads(with_torch=False):
    import numba

    n = min(THREADS, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(n)
    if with_torch:
        import torch
        torch.set_num_threads(n)
    return n


def _check_algorithm(algorithm):
    import numbaconv

    if algorithm != "auto" and algorithm not in numbaconv.algorithms():
        raise NotImplementedError(f"algorithm {algorithm!r} is not available at this commit")


def _case(algorithm, layout, shape_name):
    """``(shape, runner)`` for one parameter combination, already called once (JIT warm)."""
    _check_algorithm(algorithm)
    shape = bench.SUITE[shape_name]  # looked up now, so tests can swap the table
    x, w = bench.make_inputs(shape, layout)
    run = bench.conv_runner(shape, layout, algorithm, x, w)
    run()
    return shape, x, w, run


class Conv2d:
    """Wall time of one ``numbaconv.conv2d`` call."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, algorithm, layout, shape):
        _set_threads()
        _, _, _, self.run = _case(algorithm, layout, shape)

    def time_conv2d(self, algorithm, layout, shape):
        self.run()


class Throughput:
    """Achieved GFLOP/s (FLOPs = 2 N K C/groups R S Ho Wo, as SPEC.md counts them)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, algorithm, layout, shape):
        _set_threads()
        self.shape, _, _, self.run = _case(algorithm, layout, shape)

    def track_gflops(self, algorithm, layout, shape):
        seconds, _ = bench.time_callable(self.run, budget_s=TRACK_BUDGET_S, warmup=False)
        return self.shape.flops / seconds / 1e9

    track_gflops.unit = "GFLOP/s"


def _speedup(peer, ours):
    """The peer's time / numbaconv's, each timed in its own block, never interleaved (thread
    pools keep spinning after work and would bill one for the other)."""
    t_peer, _ = bench.time_callable(peer, budget_s=TRACK_BUDGET_S, warmup=False)
    t_ours, _ = bench.time_callable(ours, budget_s=TRACK_BUDGET_S, warmup=False)
    return t_peer / t_ours


class SpeedupVsTorch:
    """torch's time / numbaconv's time (> 1: numbaconv is faster), same process and threads."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, algorithm, layout, shape):
        try:
            import torch  # noqa: F401
        except ImportError as exc:
            raise NotImplementedError("torch is not installed") from exc
        _set_threads(with_torch=True)
        self.shape, x, w, self.run = _case(algorithm, layout, shape)
        self.torch_run = bench.torch_runner(self.shape, layout, x, w)
        self.torch_run()

    def track_speedup_vs_torch(self, algorithm, layout, shape):
        return _speedup(self.torch_run, self.run)

    track_speedup_vs_torch.unit = "x torch"


class SpeedupVsOnnxruntime:
    """onnxruntime's time / numbaconv's time (NCHW: one ONNX ``Conv`` node, MLAS, same threads)."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 300

    def setup(self, algorithm, layout, shape):
        runner = getattr(bench, "onnxruntime_runner", None)  # older checkouts of the suite lack it
        if runner is None or layout != "NCHW":
            raise NotImplementedError("onnxruntime runs NCHW only")
        _set_threads(with_torch=False)
        self.shape, x, w, self.run = _case(algorithm, layout, shape)
        self.ort_run = runner(self.shape, layout, x, w)
        if self.ort_run is None:
            raise NotImplementedError("onnxruntime is not installed")
        self.ort_run()

    def track_speedup_vs_onnxruntime(self, algorithm, layout, shape):
        return _speedup(self.ort_run, self.run)

    track_speedup_vs_onnxruntime.unit = "x onnxruntime"


class Backward:
    """The backward pass (grad input + weight + bias) of each suite layer."""

    params = (LAYOUTS, SHAPES)
    param_names = ("layout", "shape")
    timeout = 300

    def setup(self, layout, shape):
        import numpy as np

        import numbaconv

        if not hasattr(numbaconv, "conv2d_backward"):
            raise NotImplementedError("conv2d_backward is not available at this commit")
        self.threads = _set_threads()
        s = bench.SUITE[shape]
        x, w = bench.make_inputs(s, layout)
        kwargs = bench.conv_kwargs(s, layout)
        gy = np.random.default_rng(1).standard_normal(numbaconv.conv2d(x, w, **kwargs).shape).astype(x.dtype)
        self.args = (s, layout, x, w, gy)

        def run():
            return numbaconv.conv2d_backward(gy, x, w, **kwargs)

        self.run = run
        run()

    def time_conv2d_backward(self, layout, shape):
        self.run()

    def track_backward_ratio_vs_torch(self, layout, shape):
        try:
            import torch
        except ImportError as exc:
            raise NotImplementedError("torch is not installed") from exc
        torch.set_num_threads(self.threads)
        s, layout, x, w, gy = self.args
        to_t = (lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)) if layout == "NHWC" else torch.from_numpy
        xt, gyt = to_t(x), to_t(gy)
        wt = torch.from_numpy(w).permute(3, 2, 0, 1) if layout == "NHWC" else torch.from_numpy(w)

        def torch_run():
            return torch.ops.aten.convolution_backward(gyt, xt, wt, [s.k], [s.stride] * 2, [s.pad] * 2, [1, 1],
                                                       False, [0, 0], s.groups, [True, True, True])

        torch_run()
        t_torch, _ = bench.time_callable(torch_run, budget_s=TRACK_BUDGET_S, warmup=False)
        t_ours, _ = bench.time_callable(self.run, budget_s=TRACK_BUDGET_S, warmup=False)
        return t_ours / t_torch

    track_backward_ratio_vs_torch.unit = "x torch time"


class Im2colMemory:
    """Peak memory of im2col where the full column matrix (144 MiB) exceeds the 32 MiB workspace."""

    params = [LAYOUTS]
    param_names = ["layout"]
    timeout = 300

    def setup(self, layout):
        _check_algorithm("im2col")
        _set_threads()
        # compile (or load) the kernels on a tiny problem: same types, no big allocation
        tiny = bench.Shape("warm", 1, 4, 8, 4, 3, 1, 1, 1)
        bench.conv_runner(tiny, layout, "im2col", *bench.make_inputs(tiny, layout))()
        shape = bench.LARGE_IM2COL
        x, w = bench.make_inputs(shape, layout)
        self.run = bench.conv_runner(shape, layout, "im2col", x, w)

    def peakmem_im2col_large(self, layout):
        self.run()


#: the problem of the first-call benchmark (small: the time is compilation, not work)
_FIRST_CALL_SETUP = """
import os, tempfile
os.environ["NUMBA_CACHE_DIR"] = {cache_dir}
os.environ["NUMBA_NUM_THREADS"] = "{threads}"
import numpy as np
x = np.ones((1, 8, 16, 16), np.float32)
w = np.ones((16, 8, 3, 3), np.float32)
"""
_FIRST_CALL_STMT = """
import numbaconv
numbaconv.conv2d(x, w, padding=1, algorithm={algorithm!r})
"""


def _warm_cache_dir(algorithm):
    """A per-installation cache directory for the warm case (Numba invalidates stale entries)."""
    spec = importlib.util.find_spec("numbaconv")
    key = hashlib.sha1(str(spec.origin).encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"numbaconv-asv-warm-cache-{key}")


class FirstCall:
    """``import numbaconv`` + the first ``conv2d`` call in a fresh interpreter (mostly compile time).

    ``cold``: an empty ``NUMBA_CACHE_DIR`` (everything is compiled); ``warm``: a cache
    directory that already holds the compiled kernels (they are loaded).
    """

    params = (ALGORITHMS, ["cold", "warm"])
    param_names = ("algorithm", "cache")
    number = 1
    repeat = (1, 3, 60.0)
    warmup_time = 0
    timeout = 600

    def setup(self, algorithm, cache):
        _check_algorithm(algorithm)
        self.parent = tempfile.mkdtemp(prefix="numbaconv-asv-cold-")
        if cache == "cold":
            self.cache_expr = f"tempfile.mkdtemp(dir={self.parent!r})"
        else:
            cache_dir = _warm_cache_dir(algorithm)
            self.cache_expr = repr(cache_dir)
            stmt, setup = self._code(algorithm)
            subprocess.run([sys.executable, "-c", setup + stmt], check=True)  # fill the cache

    def teardown(self, algorithm, cache):
        shutil.rmtree(self.parent, ignore_errors=True)

    def _code(self, algorithm):
        setup = textwrap.dedent(_FIRST_CALL_SETUP).format(cache_dir=self.cache_expr, threads=THREADS)
        stmt = textwrap.dedent(_FIRST_CALL_STMT).format(algorithm=algorithm)
        return stmt, setup

    def timeraw_import_and_first_call(self, algorithm, cache):
        return self._code(algorithm)
