"""The public benchmark suite (SPEC.md) as data, and the measurements behind ``numbaconv bench``.

One table of shapes and implementations is shared by the CLI (:mod:`numbaconv.bench.cli`), the
asv suite (``asv_bench/``) and the tests, so a shape or an algorithm is benchmarked
everywhere as soon as it is added here or registered in :mod:`numbaconv.registry`.

Method (the same for numbaconv and torch, in one process, same thread count):

* a warm-up call first: JIT compilation (or loading from Numba's cache) is never timed;
* each implementation is timed in its own block, never interleaved with another one
  (thread pools keep spinning for a while after work, which would bill one for the other);
* the median of an adaptive number of repeats, chosen so a cell costs about ``budget_s``.

This module never imports torch at import time; :func:`torch_runner` imports it lazily
and returns ``None`` when it is missing.  It imports numbaconv lazily too, so the asv
suite can load this file next to an older installed numbaconv.
"""

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np

__all__ = [
    "Shape", "SUITE", "TINY_SUITE", "LAYOUTS", "WEIGHT_LAYOUT", "PEAK_GFLOPS", "DEFAULT_THREADS",
    "LARGE_IM2COL", "active_suite", "bench_algorithms", "make_inputs", "conv_runner", "torch_runner",
    "time_samples", "time_callable", "set_threads", "run_suite", "geomean_speedups", "first_call_latency",
    "machine_info",
]

#: Peak float32 throughput of the reference machine (2 cores, AVX2 + 2 FMA units):
#: 2 cores x 2 FMA x 8 lanes x 2 flops x ~3.75 GHz.  ``numbaconv bench --peak`` overrides it.
PEAK_GFLOPS = 240.0
#: numbaconv and torch run with this many threads in every benchmark.
DEFAULT_THREADS = 2

LAYOUTS = ("NCHW", "NHWC")
#: The weight order benchmarked with each activation layout (the contract's defaults).
WEIGHT_LAYOUT = {"NCHW": "OIHW", "NHWC": "HWIO"}


class Shape(NamedTuple):
    """One row of the public suite: ``(N, C, H=W, K, R=S, stride, pad, groups)``."""

    name: str
    n: int
    c: int
    hw: int
    k: int
    rs: int
    stride: int
    pad: int
    groups: int

    @property
    def out_hw(self):
        return (self.hw + 2 * self.pad - self.rs) // self.stride + 1

    @property
    def flops(self):
        """``2 N K (C/groups) R S Ho Wo``, as SPEC.md counts them."""
        return 2 * self.n * self.k * (self.c // self.groups) * self.rs * self.rs * self.out_hw ** 2

    def x_shape(self, layout):
        return (self.n, self.c, self.hw, self.hw) if layout == "NCHW" else (self.n, self.hw, self.hw, self.c)

    def w_shape(self, layout):
        k, cg, r = self.k, self.c // self.groups, self.rs
        return (k, cg, r, r) if WEIGHT_LAYOUT[layout] == "OIHW" else (r, r, cg, k)

    def describe(self):
        return (f"N={self.n} C={self.c} H=W={self.hw} K={self.k} R=S={self.rs} "
                f"stride={self.stride} pad={self.pad} groups={self.groups}")


def _table(*rows):
    return {row[0]: Shape(*row) for row in rows}


#: SPEC.md's public benchmark suite, in the contract's order.
SUITE = _table(
    # name                  N    C    H=W   K    R=S stride pad groups
    ("seed_notebook",       3,   3,  1000,   3,  3,  1,  0,   1),
    ("resnet_conv1",        1,   3,   224,  64,  7,  2,  3,   1),
    ("resnet_res2_3x3",     1,  64,    56,  64,  3,  1,  1,   1),
    ("resnet_res2_1x1",     1,  64,    56, 256,  1,  1,  0,   1),
    ("resnet_res3_1x1_s2",  1, 256,    56, 128,  1,  2,  0,   1),
    ("resnet_res4_3x3",     1, 256,    14, 256,  3,  1,  1,   1),
    ("resnet_res5_3x3",     1, 512,     7, 512,  3,  1,  1,   1),
    ("vgg_3x3",             1,  64,   112, 128,  3,  1,  1,   1),
    ("batch8_3x3",          8,  64,    56,  64,  3,  1,  1,   1),
    ("mobilenet_dw_s1",     1,  32,   112,  32,  3,  1,  1,  32),
    ("mobilenet_dw_s2",     1,  64,   112,  64,  3,  2,  1,  64),
    ("mobilenet_dw_14",     1, 512,    14, 512,  3,  1,  1, 512),
)

#: Tiny stand-ins with the same kinds of geometry, for tests (``NUMBACONV_BENCH_SUITE=tiny``).
TINY_SUITE = _table(
    ("tiny_3x3",            1,   4,    10,   8,  3,  1,  1,   1),
    ("tiny_s2_1x1",         2,   6,     9,   4,  1,  2,  0,   1),
    ("tiny_dw",             1,   4,     8,   4,  3,  1,  1,   4),
)

#: The ``peakmem_`` problem: its full im2col matrix (C*R*S x Ho*Wo float32 = 144 MiB) is far
#: larger than im2col's default 32 MiB workspace, which bounds the extra memory.
LARGE_IM2COL = Shape("large_im2col", 1, 64, 256, 64, 3, 1, 1, 1)

#: Environment variable that swaps in :data:`TINY_SUITE` (for the CLI's own tests).
SUITE_ENV = "NUMBACONV_BENCH_SUITE"


def suite_name(name=None):
    """``name``, else ``$NUMBACONV_BENCH_SUITE``, else ``"public"``."""
    return name or os.environ.get(SUITE_ENV) or "public"


def active_suite(name=None):
    """The shape table to run: ``"public"`` (default) or ``"tiny"`` (also via ``$NUMBACONV_BENCH_SUITE``)."""
    name = suite_name(name)
    if name == "public":
        return SUITE
    if name == "tiny":
        return TINY_SUITE
    raise ValueError(f"suite must be 'public' or 'tiny', got {name!r}")


def _real_gpu():
    # never imports numba.cuda without a CUDA driver: that would lock tests/test_cuda.py's
    # simulator out for the rest of the process.  Absolute import, no relative ones in this
    # module: asv loads this file on its own next to older commits (without cuda_conv).
    try:
        from numbaconv.cuda.conv import real_gpu
    except ImportError:
        try:  # commits before the package layout
            from numbaconv.cuda_conv import real_gpu
        except ImportError:
            return False
    return real_gpu()


def bench_algorithms():
    """Algorithm names to benchmark: the registry (``"cuda"`` only with a real GPU), then ``"auto"``."""
    import numbaconv

    names = [a for a in numbaconv.algorithms() if a != "cuda" or _real_gpu()]
    return tuple(names) + ("auto",)


def make_inputs(shape, layout, dtype=np.float32, seed=0):
    """Random ``(x, weight)`` for ``shape`` in ``layout`` (weights in :data:`WEIGHT_LAYOUT`)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape.x_shape(layout), dtype=np.float64).astype(dtype)
    w = rng.standard_normal(shape.w_shape(layout), dtype=np.float64).astype(dtype)
    w *= 1.0 / math.sqrt((shape.c // shape.groups) * shape.rs * shape.rs)  # keep outputs O(1)
    return x, w


def conv_kwargs(shape, layout):
    return dict(stride=shape.stride, padding=shape.pad, groups=shape.groups, layout=layout,
                weight_layout=WEIGHT_LAYOUT[layout])


def conv_runner(shape, layout, algorithm, x, w):
    """A no-argument callable running ``numbaconv.conv2d`` on ``shape`` with ``algorithm``."""
    import numbaconv

    kwargs = conv_kwargs(shape, layout)

    def run():
        return numbaconv.conv2d(x, w, algorithm=algorithm, **kwargs)

    return run


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def torch_runner(shape, layout, x, w):
    """A no-argument callable running ``torch.nn.functional.conv2d`` on the same data, or ``None``.

    NCHW uses contiguous tensors; NHWC uses torch's ``channels_last`` memory format for the
    input (a zero-copy view of the NHWC array) and the weights, the way torch runs NHWC.
    """
    torch = _import_torch()
    if torch is None:
        return None
    if layout == "NCHW":
        xt = torch.from_numpy(x)
        wt = torch.from_numpy(w)
    else:
        xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # channels_last strides, no copy
        wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.functional.conv2d
    stride, pad, groups = shape.stride, shape.pad, shape.groups

    def run():
        with torch.no_grad():
            return conv(xt, wt, stride=stride, padding=pad, groups=groups)

    return run


def set_threads(n):
    """Run numbaconv (Numba) and torch (if installed) with ``n`` threads; returns ``n``."""
    import numba

    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= n <= limit:
        raise ValueError(f"threads must be between 1 and NUMBA_NUM_THREADS={limit}, got {n!r}")
    numba.set_num_threads(n)
    torch = _import_torch()
    if torch is not None:
        torch.set_num_threads(numba.get_num_threads())
    return n


def time_samples(fn, budget_s=0.5, min_repeats=3, max_repeats=1000, warmup=True):
    """Seconds of each timed ``fn()`` call: a warm-up call, then repeats until ~``budget_s`` is spent.

    At least ``min_repeats`` and at most ``max_repeats`` timed calls; a slow cell stops at
    ``min_repeats``, a fast one repeats until the budget is used.
    """
    if warmup:
        fn()  # JIT compile / cache load / first-touch allocations: never timed
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if len(times) >= min_repeats and t1 - start >= budget_s:
            break
    return times


def time_callable(fn, budget_s=0.5, min_repeats=3, max_repeats=1000, warmup=True):
    """``(median seconds, repeats)`` of :func:`time_samples`."""
    times = time_samples(fn, budget_s, min_repeats, max_repeats, warmup)
    return statistics.median(times), len(times)


class Progress:
    """A small progress bar on stderr (redrawn in place on a terminal, every ~10 % otherwise)."""

    def __init__(self, total, stream=None, enabled=True, width=28):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_decile = -1

    def step(self, label=""):
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / self.total
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:6.1f}s {label}"
        if self.tty:
            self.stream.write("\r" + text[:119].ljust(119))
            if self.done >= self.total:
                self.stream.write("\n")
        else:
            decile = int(frac * 10)
            if decile != self._last_decile or self.done >= self.total:
                self._last_decile = decile
                self.stream.write(text + "\n")
        self.stream.flush()


def run_suite(shapes, layouts=LAYOUTS, algorithms=None, *, budget_s=0.5, min_repeats=3,
              peak_gflops=PEAK_GFLOPS, with_torch=True, progress=True, stream=None, rounds=1):
    """Measure every ``shape x layout x algorithm`` (plus torch); returns a list of result dicts.

    Each dict: ``shape, layout, algorithm, ms`` (median), ``gflops, pct_peak,
    speedup_vs_torch, repeats, flops, min_ms`` (fastest repeat: on a busy machine the median
    can catch preemptions of the second thread); torch's own rows have ``algorithm="torch"``.  ``speedup_vs_torch`` is torch's
    time divided by the algorithm's (> 1: faster than torch), ``None`` without torch.

    ``rounds > 1`` sweeps the whole suite that many times and keeps, per cell, the lowest
    of its rounds' medians (torch's too): on a shared machine a burst of load from elsewhere
    spoils one block of timings, and the rounds are minutes apart.
    """
    if algorithms is None:
        algorithms = bench_algorithms()
    if isinstance(shapes, dict):
        shapes = list(shapes.values())
    torch_ok = with_torch and _import_torch() is not None
    impls = (["torch"] if torch_ok else []) + list(algorithms)
    bar = Progress(rounds * len(shapes) * len(layouts) * len(impls), stream=stream, enabled=progress)
    best = {}
    for _ in range(rounds):
        for shape in shapes:
            for layout in layouts:
                x, w = make_inputs(shape, layout)
                for impl in impls:  # one block per implementation, never interleaved
                    if impl == "torch":
                        fn = torch_runner(shape, layout, x, w)
                    else:
                        fn = conv_runner(shape, layout, impl, x, w)
                    times = time_samples(fn, budget_s=budget_s, min_repeats=min_repeats)
                    key = (shape.name, layout, impl)
                    row = dict(shape=shape.name, layout=layout, algorithm=impl,
                               ms=statistics.median(times) * 1e3, speedup_vs_torch=None,
                               repeats=len(times), flops=shape.flops, min_ms=min(times) * 1e3)
                    if key not in best or row["ms"] < best[key]["ms"]:
                        best[key] = row
                    bar.step(f"{shape.name} {layout} {impl}")
    results = []
    for shape in shapes:
        for layout in layouts:
            cell = [best[(shape.name, layout, impl)] for impl in impls]
            for row in cell:
                row["gflops"] = shape.flops / row["ms"] * 1e-6
                row["pct_peak"] = 100.0 * row["gflops"] / peak_gflops
                if torch_ok:
                    row["speedup_vs_torch"] = cell[0]["ms"] / row["ms"]
            results.extend(cell)
    return results


def geomean_speedups(results):
    """``{algorithm: geometric mean of speedup_vs_torch}`` over all shapes and layouts."""
    logs = {}
    for row in results:
        if row["algorithm"] != "torch" and row.get("speedup_vs_torch"):
            logs.setdefault(row["algorithm"], []).append(math.log(row["speedup_vs_torch"]))
    return {name: math.exp(sum(v) / len(v)) for name, v in logs.items()}


# -- first-call latency (compile time) -----------------------------------------------------

#: Code run in a fresh interpreter: time ``import numbaconv`` and the first ``conv2d`` call.
_FIRST_CALL_CODE = r"""
import json, sys, time
import numpy as np
algorithm, layout = sys.argv[1], sys.argv[2]
x = np.ones((1, 8, 16, 16) if layout == "NCHW" else (1, 16, 16, 8), np.float32)
w = np.ones((16, 8, 3, 3) if layout == "NCHW" else (3, 3, 8, 16), np.float32)
t0 = time.perf_counter()
import numbaconv
t1 = time.perf_counter()
numbaconv.conv2d(x, w, padding=1, layout=layout, algorithm=algorithm)
t2 = time.perf_counter()
numbaconv.conv2d(x, w, padding=1, layout=layout, algorithm=algorithm)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "first_call_s": t2 - t1, "second_call_s": t3 - t2}))
"""


def _first_call_process(algorithm, layout, cache_dir, threads):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, NUMBA_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _FIRST_CALL_CODE, algorithm, layout], env=env,
                          capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"first-call subprocess for algorithm={algorithm!r} failed:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_s"] = wall
    return out


def first_call_latency(algorithms=None, layouts=("NCHW",), threads=DEFAULT_THREADS, progress=True,
                       stream=None):
    """First-call latency of ``conv2d`` in fresh processes, with a cold and a warm Numba cache.

    For each algorithm and layout: a process with an empty temporary ``NUMBA_CACHE_DIR``
    (cold: everything is compiled), then a second process on the same directory (warm: the
    kernels are loaded from the cache).  Returns a list of dicts with ``import_s``,
    ``first_call_s``, ``second_call_s`` and ``process_s`` (whole interpreter) per ``cache``.
    """
    if algorithms is None:
        algorithms = bench_algorithms()
    bar = Progress(2 * len(algorithms) * len(layouts), stream=stream, enabled=progress)
    rows = []
    for algorithm in algorithms:
        for layout in layouts:
            with tempfile.TemporaryDirectory(prefix="numbaconv-cache-") as cache_dir:
                for cache in ("cold", "warm"):
                    out = _first_call_process(algorithm, layout, cache_dir, threads)
                    rows.append(dict(algorithm=algorithm, layout=layout, cache=cache, **out))
                    bar.step(f"first call {algorithm} {layout} {cache}")
    return rows


# -- machine description --------------------------------------------------------------------

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def machine_info(threads=None, peak_gflops=PEAK_GFLOPS):
    import numba

    import numbaconv

    torch = _import_torch()
    return dict(
        hostname=platform.node(), platform=platform.platform(), cpu=_cpu_model(),
        cpu_count=os.cpu_count(), python=platform.python_version(), numpy=np.__version__,
        numba=numba.__version__, torch=getattr(torch, "__version__", None),
        numbaconv=numbaconv.__version__, commit=_git_commit(),
        threads=threads if threads is not None else numba.get_num_threads(),
        peak_gflops=peak_gflops, algorithms=list(numbaconv.algorithms()),
    )
