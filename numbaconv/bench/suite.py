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
    "Shape", "SUITE", "TINY_SUITE", "LAYOUTS", "WEIGHT_LAYOUT", "DEFAULT_THREADS", "PEERS",
    "LARGE_IM2COL", "active_suite", "bench_algorithms", "make_inputs", "conv_runner", "torch_runner",
    "time_samples", "time_callable", "set_threads", "run_suite", "geomean_speedups", "first_call_latency",
    "machine_info", "measure_peak", "onnxruntime_runner",
]

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


#: the peers timed next to numbaconv, in this order: torch (both layouts), onnxruntime (NCHW)
PEERS = ("torch", "onnxruntime")


def _import_onnxruntime():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        return None
    return onnx, onnxruntime


def onnxruntime_runner(shape, layout, x, w):
    """A no-argument callable running onnxruntime (MLAS) on the same data, or ``None``.

    One ``Conv`` node with the weights as an initializer, ``ORT_ENABLE_ALL``, as many
    intra-op threads as numbaconv and torch get (:func:`set_threads`), one inter-op thread.
    NCHW only: ONNX's ``Conv`` is NCHW (a channels-last model gets transposes around it).
    """
    mods = _import_onnxruntime()
    if mods is None or layout != "NCHW":
        return None
    onnx, ort = mods
    from onnx import TensorProto, helper, numpy_helper
    ho = shape.out_hw
    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[shape.stride] * 2, pads=[shape.pad] * 4,
                            group=shape.groups, kernel_shape=[shape.rs] * 2)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [shape.n, shape.k, ho, ho])],
                              initializer=[numpy_helper.from_array(np.ascontiguousarray(w), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    import numba
    opts.intra_op_num_threads = numba.get_num_threads()  # what set_threads gave numbaconv and torch
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": np.ascontiguousarray(x)}

    def run():
        return sess.run(None, feed)[0]

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


def _check_output(impl, shape, layout, y, ref):
    """A benchmark that times a wrong answer is worthless: every implementation's output must
    match the cell's reference (torch where installed) within float32 rounding."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    if y.shape != ref.shape or not np.all(np.abs(y - ref) <= 1e-3 * scale):
        raise RuntimeError(f"{impl} gives a different result on {shape.name} {layout}")


def run_suite(shapes, layouts=LAYOUTS, algorithms=None, *, budget_s=0.5, min_repeats=3,
              peak_gflops=None, with_torch=True, with_onnxruntime=True, progress=True, stream=None, rounds=1):
    """Measure every ``shape x layout x algorithm`` (plus the peers); returns a list of result dicts.

    Each dict: ``shape, layout, algorithm, ms`` (median), ``gflops, pct_peak`` (of
    ``peak_gflops``, ``None`` without it), ``speedup_vs_torch, speedup_vs_onnxruntime,
    repeats, flops, min_ms`` (fastest repeat: on a busy machine the median can catch
    preemptions of the second thread); the peers' own rows have ``algorithm="torch"`` /
    ``"onnxruntime"`` (NCHW only).  A speedup is the peer's time divided by the row's (> 1:
    faster than the peer), ``None`` where that peer was not timed.  Every output is checked
    against the cell's first one (torch's where installed).

    ``rounds > 1`` sweeps the whole suite that many times and keeps, per cell, the lowest
    of its rounds' medians (the peers' too): on a shared machine a burst of load from elsewhere
    spoils one block of timings, and the rounds are minutes apart.
    """
    if algorithms is None:
        algorithms = bench_algorithms()
    if isinstance(shapes, dict):
        shapes = list(shapes.values())
    peers = {"torch": (torch_runner, with_torch and _import_torch() is not None),
             "onnxruntime": (onnxruntime_runner, with_onnxruntime and _import_onnxruntime() is not None)}
    peers = {name: runner for name, (runner, ok) in peers.items() if ok}
    cells = [(shape, layout, ["torch"] * ("torch" in peers) + ["onnxruntime"] * ("onnxruntime" in peers
                                                                                 and layout == "NCHW")
              + list(algorithms)) for shape in shapes for layout in layouts]
    bar = Progress(rounds * sum(len(impls) for _, _, impls in cells), stream=stream, enabled=progress)
    best = {}
    for _ in range(rounds):
        for shape, layout, impls in cells:
            x, w = make_inputs(shape, layout)
            ref = None
            for impl in impls:  # one block per implementation, never interleaved
                fn = peers[impl](shape, layout, x, w) if impl in peers else conv_runner(shape, layout, impl, x, w)
                y = fn()  # the warm-up: JIT compile / cache load / first touch, never timed
                y = y.numpy() if hasattr(y, "numpy") else y
                y = y if layout == "NCHW" or impl != "torch" else np.ascontiguousarray(y.transpose(0, 2, 3, 1))
                if ref is None:
                    ref = y
                else:
                    _check_output(impl, shape, layout, y, ref)
                times = time_samples(fn, budget_s=budget_s, min_repeats=min_repeats, warmup=False)
                key = (shape.name, layout, impl)
                row = dict(shape=shape.name, layout=layout, algorithm=impl, ms=statistics.median(times) * 1e3,
                           speedup_vs_torch=None, speedup_vs_onnxruntime=None, repeats=len(times),
                           flops=shape.flops, min_ms=min(times) * 1e3)
                if key not in best or row["ms"] < best[key]["ms"]:
                    best[key] = row
                bar.step(f"{shape.name} {layout} {impl}")
    results = []
    for shape, layout, impls in cells:
        cell = {impl: best[(shape.name, layout, impl)] for impl in impls}
        for row in cell.values():
            row["gflops"] = shape.flops / row["ms"] * 1e-6
            row["pct_peak"] = 100.0 * row["gflops"] / peak_gflops if peak_gflops else None
            for peer in peers:
                if peer in cell:
                    row[f"speedup_vs_{peer}"] = cell[peer]["ms"] / row["ms"]
        results.extend(cell.values())
    return results


def geomean_speedups(results, peer="torch"):
    """``{algorithm: geometric mean of speedup_vs_<peer>}`` over all shapes and layouts."""
    logs = {}
    for row in results:
        if row["algorithm"] not in PEERS and row.get(f"speedup_vs_{peer}"):
            logs.setdefault(row["algorithm"], []).append(math.log(row[f"speedup_vs_{peer}"]))
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


def _isa_flags():
    """The CPU's SIMD / matrix extensions (from /proc/cpuinfo's flags)."""
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in have]
    except OSError:
        pass
    return []


def measure_peak(threads=None):
    """``{"fma_gflops", "sgemm_gflops"}`` measured on this machine with ``threads`` threads:
    numbaconv's FMA probe at the compile target's full width (``numbaconv.cpu.peak``; ``None``
    on a numbaconv without it) and a 2048^3 float32 matrix product through numpy's BLAS."""
    fma = None
    try:
        from numbaconv.cpu import peak
    except ImportError:  # an older numbaconv (asv runs this file against past commits)
        peak = None
    if peak is not None:
        fma = peak.fma_peak_gflops(threads)
    a = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)
    sgemm = 2 * 2048 ** 3 / min(time_samples(lambda: a @ a, budget_s=0.5, min_repeats=3)) * 1e-9
    return dict(fma_gflops=fma, sgemm_gflops=sgemm)


def machine_info(threads=None, peak=None):
    """This machine as the results' JSON records it: CPU model, ISA flags, the LLVM target
    Numba compiles for, versions, threads, and the measured peaks (``peak``: a dict from
    :func:`measure_peak`, measured here when ``None``)."""
    import numba

    import numbaconv

    torch = _import_torch()
    ort = _import_onnxruntime()
    threads = threads if threads is not None else numba.get_num_threads()
    target = None
    try:
        from numbaconv.cpu._vec import target_description, target_vector_bytes
        target = dict(zip(("triple", "cpu", "features"), target_description()), vector_bytes=target_vector_bytes())
    except ImportError:
        pass
    peak = peak if peak is not None else measure_peak(threads)
    wisdom = None
    try:  # the per-machine tuning in use (numbaconv tune), if any
        from numbaconv import tuning
        w = tuning.wisdom()
        if w is not None:
            wisdom = dict(path=tuning.wisdom_path(), knobs=w["knobs"], choices=len(w["choices"]))
    except ImportError:  # an older numbaconv
        pass
    return dict(
        hostname=platform.node(), platform=platform.platform(), cpu=_cpu_model(), isa=_isa_flags(),
        llvm_target=target, cpu_count=os.cpu_count(), python=platform.python_version(), numpy=np.__version__,
        numba=numba.__version__, torch=getattr(torch, "__version__", None),
        onnxruntime=getattr(ort[1], "__version__", None) if ort else None,
        numbaconv=numbaconv.__version__, commit=_git_commit(), threads=threads,
        peak_gflops=peak["fma_gflops"], sgemm_gflops=peak["sgemm_gflops"], algorithms=list(numbaconv.algorithms()),
        wisdom=wisdom,
    )
