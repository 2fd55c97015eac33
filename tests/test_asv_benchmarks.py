"""Every asv benchmark method runs once on tiny shapes, so the asv suite cannot rot (numbagg style).

The shape table is monkeypatched to :data:`numbaconv.bench.suite.TINY_SUITE`; the benchmarks look
shapes up at ``setup`` time, so they run exactly the code asv runs, only smaller.
"""

import importlib.util
import inspect
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from numbaconv.bench import suite as bench

ROOT = Path(__file__).resolve().parents[1]
PREFIXES = ("time_", "track_", "peakmem_", "mem_", "timeraw_")


def _load_benchmarks():
    spec = importlib.util.spec_from_file_location("asv_benchmarks_under_test", ROOT / "asv_bench" / "benchmarks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmarks = _load_benchmarks()


def _methods():
    """``(class, method name)`` for every benchmark method in the module."""
    found = []
    for _, cls in inspect.getmembers(benchmarks, inspect.isclass):
        if cls.__module__ != benchmarks.__name__:
            continue
        for name in dir(cls):
            if name.startswith(PREFIXES) and callable(getattr(cls, name)):
                found.append((cls, name))
    return found


METHODS = _methods()


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setattr(bench, "SUITE", bench.TINY_SUITE)
    monkeypatch.setattr(bench, "LARGE_IM2COL", bench.Shape("large_tiny", 1, 8, 20, 8, 3, 1, 1, 1))
    monkeypatch.setattr(benchmarks, "TRACK_BUDGET_S", 0.002)
    assert benchmarks.bench is bench  # the benchmarks share the installed table


def _tiny_params(cls):
    """Parameter combinations on tiny shapes: every algorithm and layout; one shape, cheap first-call."""
    names = list(getattr(cls, "param_names", ()))
    params = getattr(cls, "params", ())
    if not names:
        return [()]
    if len(names) == 1 and not isinstance(params[0], (list, tuple)):
        params = [params]
    choices = []
    for name, values in zip(names, params):
        if name == "shape":
            values = list(bench.TINY_SUITE)[:1]
        elif cls is benchmarks.FirstCall and name == "algorithm":
            values = ["naive"]  # one compile per cache state keeps this test short
        choices.append(list(values))
    return list(itertools.product(*choices))


def _run_timeraw(code):
    stmt, setup = code if isinstance(code, tuple) else (code, "")
    proc = subprocess.run([sys.executable, "-c", setup + "\n" + stmt], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_benchmarks_discovered():
    kinds = {name.split("_")[0] for _, name in METHODS}
    assert kinds == {"time", "track", "peakmem", "timeraw"}, METHODS
    assert benchmarks.SHAPES == list(bench.SUITE)  # the public table, shared with the CLI
    # every registered (host) algorithm is benchmarked: add new ones to benchmarks.ALGORITHMS
    assert set(benchmarks.ALGORITHMS) >= set(bench.bench_algorithms())


def test_units_set():
    for cls, name in METHODS:
        if name.startswith("track_"):
            assert getattr(getattr(cls, name), "unit", None), f"{cls.__name__}.{name} has no unit"


@pytest.mark.parametrize("cls, name", METHODS, ids=[f"{c.__name__}.{n}" for c, n in METHODS])
def test_benchmark_runs_once(tiny, cls, name):
    if cls is benchmarks.SpeedupVsTorch:
        pytest.importorskip("torch")
    ran = 0
    for params in _tiny_params(cls):
        instance = cls()
        if hasattr(instance, "setup"):
            try:
                instance.setup(*params)
            except NotImplementedError:  # asv's "skip this combination" (onnxruntime: NCHW only)
                continue
        ran += 1
        try:
            result = getattr(instance, name)(*params)
            if name.startswith("track_"):
                assert isinstance(result, float) and result > 0, (params, result)
            elif name.startswith("timeraw_"):
                _run_timeraw(result)
        finally:
            if hasattr(instance, "teardown"):
                instance.teardown(*params)
    assert ran, f"{cls.__name__}: every parameter combination was skipped"


def test_bench_module_loads_standalone():
    """asv loads numbaconv/bench/suite.py by path next to older installed commits: no relative imports."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('standalone_bench', {str(ROOT / 'numbaconv' / 'bench' / 'suite.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "assert 'auto' in m.bench_algorithms() and m.SUITE\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
