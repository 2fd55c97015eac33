"""``numbaconv bench``: the CLI runs on tiny shapes and its table, JSON and plot have the promised shape."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import numbaconv
from numbaconv.bench import cli
from numbaconv.bench import suite as bench
from numbaconv.problem import ConvProblem

try:
    import torch  # noqa: F401
    HAVE_TORCH = True
except ImportError:  # pragma: no cover
    HAVE_TORCH = False
HAVE_ORT = bench._import_onnxruntime() is not None

SPEC_NAMES = ["seed_notebook", "resnet_conv1", "resnet_res2_3x3", "resnet_res2_1x1", "resnet_res3_1x1_s2",
              "resnet_res4_3x3", "resnet_res5_3x3", "vgg_3x3", "batch8_3x3", "mobilenet_dw_s1",
              "mobilenet_dw_s2", "mobilenet_dw_14"]
COLUMNS = ["shape", "layout", "algorithm", "ms", "GFLOP/s", "% peak"]


def test_suite_is_the_contracts_table():
    assert list(bench.SUITE) == SPEC_NAMES
    assert bench.SUITE["seed_notebook"] == ("seed_notebook", 3, 3, 1000, 3, 3, 1, 0, 1)
    assert bench.SUITE["mobilenet_dw_14"] == ("mobilenet_dw_14", 1, 512, 14, 512, 3, 1, 1, 512)


@pytest.mark.parametrize("layout", bench.LAYOUTS)
@pytest.mark.parametrize("name", SPEC_NAMES + list(bench.TINY_SUITE))
def test_shape_geometry_matches_conv_problem(name, layout):
    shape = {**bench.SUITE, **bench.TINY_SUITE}[name]
    x = np.empty(shape.x_shape(layout), np.float32)
    w = np.empty(shape.w_shape(layout), np.float32)
    p = ConvProblem.from_args(x, w, **{k: v for k, v in bench.conv_kwargs(shape, layout).items()})
    assert p.flops == shape.flops
    assert p.ho == p.wo == shape.out_hw


def test_bench_algorithms_iterate_the_registry():
    names = bench.bench_algorithms()
    assert names[-1] == "auto"
    assert set(names[:-1]) == set(numbaconv.algorithms()) - ({"cuda"} if not bench._real_gpu() else set())


def test_bench_module_does_not_import_torch():
    code = "import sys, numbaconv, numbaconv.bench.suite, numbaconv.bench.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _run_cli(capsys, *args):
    assert cli.main(["bench", "--suite", "tiny", "--quick", "--budget", "0.01", *args]) == 0
    return capsys.readouterr()


def _table_rows(stdout):
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["shape", "layout", "algorithm"])
    rows = []
    for line in lines[head + 2:]:
        if not line.strip():
            continue
        if line.startswith("geometric mean"):
            break
        rows.append(line.split())
    return lines[head], rows


def test_cli_table_and_json(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    captured = _run_cli(capsys, "--json", str(out_json))
    header, rows = _table_rows(captured.out)
    for column in COLUMNS:
        assert column in header
    assert ("vs torch" in header) == HAVE_TORCH
    assert ("vs onnxruntime" in header) == HAVE_ORT
    impls = list(bench.bench_algorithms()) + (["torch"] if HAVE_TORCH else [])
    expected = {(s, lay, a) for s in bench.TINY_SUITE for lay in bench.LAYOUTS for a in impls}
    expected |= {(s, "NCHW", "onnxruntime") for s in bench.TINY_SUITE if HAVE_ORT}
    assert {(r[0], r[1], r[2]) for r in rows} == expected
    assert "] " in captured.err  # the progress bar
    if HAVE_TORCH:
        assert "geometric mean speedup vs torch:" in captured.out

    doc = json.loads(out_json.read_text())
    assert set(doc) >= {"machine", "config", "results", "geomean_speedup_vs_torch", "first_call"}
    peak = doc["machine"]["peak_gflops"]
    assert doc["machine"]["threads"] == 2 and peak > 0 and doc["machine"]["sgemm_gflops"] > 0  # measured here
    assert f"FMA peak {peak:.0f} GFLOP/s (measured)" in captured.out
    for key in ("cpu", "isa", "llvm_target", "numba", "numpy", "numbaconv", "algorithms"):
        assert key in doc["machine"]
    assert doc["machine"]["llvm_target"]["vector_bytes"] in (16, 32, 64)
    assert doc["config"]["suite"] == "tiny" and doc["config"]["quick"] is True
    assert len(doc["results"]) == len(expected)
    for r in doc["results"]:
        assert set(r) >= {"shape", "layout", "algorithm", "ms", "gflops", "pct_peak", "speedup_vs_torch",
                          "repeats", "flops", "min_ms"}
        assert 0 < r["min_ms"] <= r["ms"]
        assert r["ms"] > 0 and r["gflops"] > 0 and r["repeats"] >= 3
        assert r["pct_peak"] == pytest.approx(100 * r["gflops"] / peak)
        assert (r["speedup_vs_torch"] is not None) == HAVE_TORCH
        assert (r["speedup_vs_onnxruntime"] is not None) == (HAVE_ORT and r["layout"] == "NCHW")
        if r["algorithm"] == "torch":
            assert r["speedup_vs_torch"] == pytest.approx(1.0)
    assert set(doc["geomean_speedup_vs_torch"]) == (set(bench.bench_algorithms()) if HAVE_TORCH else set())


def test_cli_selection_threads_and_peak(tmp_path, capsys):
    out_json = tmp_path / "b.json"
    _run_cli(capsys, "--algorithms", "naive", "--layouts", "NHWC", "--shapes", "tiny_dw", "--threads", "1",
             "--peak", "100", "--no-torch", "--json", str(out_json))
    doc = json.loads(out_json.read_text())
    assert [(r["shape"], r["layout"], r["algorithm"]) for r in doc["results"]] == [("tiny_dw", "NHWC", "naive")]
    assert doc["machine"]["threads"] == 1 and doc["results"][0]["speedup_vs_torch"] is None
    assert doc["results"][0]["pct_peak"] == pytest.approx(doc["results"][0]["gflops"])
    bench.set_threads(bench.DEFAULT_THREADS)


def test_rounds_keep_each_cells_best_round(monkeypatch):
    """``rounds=3``: every cell timed three times; each keeps its lowest round median, and the
    speedup is computed from the kept medians (a slow round of torch's or ours is dropped)."""
    shape = bench.TINY_SUITE["tiny_dw"]
    calls = []
    # the medians each call of time_samples returns, in call order: round r, impl i
    medians = {("torch", 0): 4.0, ("naive", 0): 9.0,
               ("torch", 1): 2.0, ("naive", 1): 5.0,
               ("torch", 2): 3.0, ("naive", 2): 1.0}

    def fake_samples(fn, budget_s, min_repeats, warmup):
        impl = "torch" if len(calls) % 2 == 0 else "naive"
        m = medians[(impl, len(calls) // 2)]
        calls.append(impl)
        return [m * 1e-3, m * 1e-3 * 0.5, m * 1e-3 * 2]  # median m ms, fastest m/2
    monkeypatch.setattr(bench, "time_samples", fake_samples)
    monkeypatch.setattr(bench, "torch_runner", lambda *a: lambda: np.zeros(3))
    monkeypatch.setattr(bench, "conv_runner", lambda *a: lambda: np.zeros(3))
    monkeypatch.setattr(bench, "_import_torch", lambda: object())
    rows = bench.run_suite([shape], ["NCHW"], ["naive"], rounds=3, progress=False, with_onnxruntime=False)
    assert calls == ["torch", "naive"] * 3
    t, n = rows
    assert (t["algorithm"], t["ms"], t["min_ms"]) == ("torch", pytest.approx(2.0), pytest.approx(1.0))
    assert (n["algorithm"], n["ms"], n["min_ms"]) == ("naive", pytest.approx(1.0), pytest.approx(0.5))
    assert n["speedup_vs_torch"] == pytest.approx(2.0)
    assert n["gflops"] == pytest.approx(shape.flops / 1e-3 / 1e9)


def test_a_wrong_output_fails_the_benchmark(monkeypatch):
    """Every implementation's output is compared with the cell's first (torch's): a fast wrong
    answer is an error, not a table row."""
    monkeypatch.setattr(bench, "conv_runner", lambda *a: lambda: np.ones(3))
    monkeypatch.setattr(bench, "torch_runner", lambda *a: lambda: np.zeros(3))
    monkeypatch.setattr(bench, "_import_torch", lambda: object())
    with pytest.raises(RuntimeError, match="naive gives a different result on tiny_dw NCHW"):
        bench.run_suite([bench.TINY_SUITE["tiny_dw"]], ["NCHW"], ["naive"], progress=False, with_onnxruntime=False)


@pytest.mark.skipif(not (HAVE_ORT and HAVE_TORCH), reason="needs onnxruntime and torch")
@pytest.mark.parametrize("name", list(bench.TINY_SUITE))
def test_onnxruntime_peer_computes_the_same_convolution(name):
    """The onnxruntime peer runs the suite's geometry (stride, padding, groups) on the same data."""
    shape = bench.TINY_SUITE[name]
    x, w = bench.make_inputs(shape, "NCHW")
    expected = bench.torch_runner(shape, "NCHW", x, w)().numpy()
    got = bench.onnxruntime_runner(shape, "NCHW", x, w)()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert bench.onnxruntime_runner(shape, "NHWC", x, w) is None  # ONNX Conv is NCHW


def test_measured_peak_is_positive_and_finite():
    peak = bench.measure_peak(1)
    assert 0 < peak["fma_gflops"] < 1e5 and 0 < peak["sgemm_gflops"] < 1e5


@pytest.mark.parametrize("args", [["--algorithms", "nope"], ["--layouts", "NCWH"], ["--shapes", "resnet_res2_3x3"]])
def test_cli_rejects_unknown_names(args, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--suite", "tiny", "--quick", *args])
    assert "unknown" in str(info.value)


def test_cli_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    captured = _run_cli(capsys, "--layouts", "NCHW,NHWC", "--plot", str(png))
    assert f"wrote {png}" in captured.out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cli_first_call(capsys):
    captured = _run_cli(capsys, "--first-call-only", "--algorithms", "naive", "--layouts", "NCHW")
    assert "first-call latency" in captured.out
    rows = [line.split() for line in captured.out.splitlines() if line.startswith("naive")]
    assert [r[2] for r in rows] == ["cold", "warm"]
    cold, warm = (float(r[4]) for r in rows)
    assert cold > warm > 0  # a warm cache loads the kernels instead of compiling them


@pytest.mark.parametrize("launcher", ["module", "script"])
def test_entry_points(launcher, tmp_path):
    if launcher == "module":
        cmd = [sys.executable, "-m", "numbaconv"]
    else:
        exe = shutil.which("numbaconv")
        if exe is None:
            pytest.skip("numbaconv console script not on PATH (package not installed)")
        cmd = [exe]
    args = ["bench", "--quick", "--budget", "0.01", "--algorithms", "im2col", "--layouts", "NCHW", "--no-progress"]
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, bench.SUITE_ENV: "tiny"})
    assert proc.returncode == 0, proc.stderr
    assert "tiny_3x3" in proc.stdout and "im2col" in proc.stdout


def test_cli_plot_without_matplotlib_fails_early(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--suite", "tiny", "--quick", "--plot", str(tmp_path / "x.png")])
    assert "matplotlib" in str(info.value) and "pip install" in str(info.value)
    assert capsys.readouterr().out == ""  # refused before measuring anything
