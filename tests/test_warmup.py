"""``numbaconv.warmup`` / ``numbaconv warmup``: compile ahead into Numba's cache."""

import os
import subprocess
import sys

import pytest

import numbaconv
from numbaconv.cache import MODELS, model_layers

#: published multiply-accumulate counts of the torchvision models at 224 x 224 (their model
#: cards' "GFLOPS", which count MACs and include the small classifier layer)
PUBLISHED_GMACS = {"resnet18": 1.81, "resnet50": 4.09, "mobilenet_v2": 0.30}
#: conv layers in torchvision's definitions
CONV_COUNT = {"resnet18": 20, "resnet50": 53, "mobilenet_v2": 52}


def _macs(layer):
    n, c, h, w = layer["x_shape"]
    k, cg, r, s = layer["w_shape"]
    pad, stride = layer["padding"], layer["stride"]
    ho, wo = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    return n * k * cg * r * s * ho * wo


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_model_tables_match_the_published_architectures(name):
    layers = MODELS[name]()
    assert len(layers) == CONV_COUNT[name]
    gmacs = sum(_macs(layer) for layer in layers) / 1e9
    assert gmacs == pytest.approx(PUBLISHED_GMACS[name], rel=0.02)
    assert len(model_layers(name)) < len(layers)  # repeated blocks are warmed once


def test_bad_requests_are_value_errors():
    with pytest.raises(ValueError, match="layers or a model"):
        numbaconv.warmup()
    with pytest.raises(ValueError, match="model must be one of"):
        numbaconv.warmup(model="vgg11")
    with pytest.raises(ValueError, match="dtypes"):
        numbaconv.warmup([(1, 2, 5, 5, 2, 3, 3)], dtypes=("int32",))
    with pytest.raises(ValueError, match="a layer must be"):
        numbaconv.warmup([(1, 2, 5)])


def test_warmup_fills_the_cache_then_is_a_no_op(tmp_path, monkeypatch):
    """A fresh cache directory: the first warmup compiles, a second one (new worker
    processes) loads everything and compiles nothing."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    layer = (1, 3, 6, 7, 4, 3, 3, 1, 1)
    first = numbaconv.warmup([layer], layouts=("NCHW",), algorithms=("naive",), verbose=False)
    assert [r["compiled"] > 0 for r in first] == [True]
    assert any(tmp_path.rglob("*.nbi"))  # Numba's cache index files
    second = numbaconv.warmup([layer], layouts=("NCHW",), algorithms=("naive",), verbose=False)
    assert [r["compiled"] for r in second] == [0]


def test_warmup_compiles_the_epilogue_variants(tmp_path, monkeypatch):
    """``epilogue=True`` compiles what ``activation=`` adds (here: the epilogue pass after
    ``naive``), which a plain warmup leaves out; then it too is a no-op."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    layer = (1, 3, 6, 7, 4, 3, 3, 1, 1)
    kw = dict(layouts=("NCHW",), algorithms=("naive",), verbose=False)
    assert numbaconv.warmup([layer], **kw)[0]["compiled"] > 0
    assert numbaconv.warmup([layer], epilogue=True, **kw)[0]["compiled"] > 0
    again = numbaconv.warmup([layer], epilogue=True, **kw)
    # (the other activations, a plan; convert's max pooling)
    assert [r["algorithm"] for r in again] == ["naive", "epilogues", "max_pool2d"]
    assert [r["compiled"] for r in again] == [0, 0, 0]


def test_warmup_epilogues_leave_a_model_nothing_to_compile(tmp_path, monkeypatch):
    """A fused kernel compiles one epilogue variant and its runs one per activation: after an
    ``epilogue=True`` warmup, every activation and a plan without one compile nothing."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    layer = (1, 16, 8, 8, 16, 3, 3, 1, 1)
    numbaconv.warmup([layer], layouts=("NCHW",), algorithms=("tiled",), epilogue=True, verbose=False)
    code = ("import numpy as np, numbaconv; from numba.core.event import install_recorder\n"
            "x = np.ones((1, 16, 8, 8), np.float32); w = np.ones((16, 16, 3, 3), np.float32)\n"
            "with install_recorder('numba:compile') as rec:\n"
            "    for a in (None, 'relu', 'relu6', 'silu', 'hardswish'):\n"
            "        numbaconv.Conv2dPlan(w, padding=1, algorithm='tiled', activation=a)(x)\n"
            "        numbaconv.conv2d(x, w, padding=1, algorithm='tiled', activation=a, residual=x)\n"
            "    from numbaconv.cpu import pool\n"
            "    pool.max_pool2d(x, (3, 3), (2, 2), (1, 1), (1, 1), True, 'NCHW')\n"
            "print(sum(1 for _, ev in rec.buffer if ev.is_end))")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0"


def test_cli_warmup(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "numbaconv", "warmup", "--layer", "1,3,6,7,4,3,3", "--algorithms", "naive",
           "--layouts", "NHWC"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "functions compiled (now cached)" in proc.stdout and str(tmp_path) in proc.stdout
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert "0 functions compiled (the cache was warm: nothing to do)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "numbaconv", "warmup"], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "give --model or --layer" in proc.stderr


def test_cache_entries_depend_on_every_kernel_source(tmp_path):
    """Numba hashes only the file a kernel is defined in; numbaconv's entries also carry a
    hash of every kernel source, so a change to a helper in another file (``_vec``'s
    register blocks) cannot load machine code built from the old helper."""
    import pathlib
    import shutil

    from numbaconv.cpu import _jit, tiled, winograd
    for kernel in (winograd._tasks, tiled._pad_nhwc):
        locator = kernel._cache._impl.locator
        assert type(locator).__name__.startswith("Numbaconv")
        assert locator.get_source_stamp()[1] == _jit.package_stamp()
    root = pathlib.Path(_jit.__file__).resolve().parents[1]
    copy = tmp_path / "numbaconv"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert _jit.package_stamp(copy) == _jit.package_stamp()
    helper = copy / "cpu" / "_vec.py"
    helper.write_text(helper.read_text() + "\n# a changed helper\n")
    assert _jit.package_stamp(copy) != _jit.package_stamp()
