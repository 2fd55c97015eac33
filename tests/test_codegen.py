"""Codegen on every x86-64 family, from any x86-64 machine.

Each case compiles numbaconv's register-blocked kernels (tiled's micro-kernels and the
NCHW 1x1 task that inlines them, dot's block, the NHWC depthwise block, Winograd's GEMM
block and tile transforms, the fused epilogue's loops) for a named CPU in a subprocess
(``NUMBA_CPU_NAME`` with ``NUMBA_CPU_FEATURES=""``: LLVM's own feature set and tuning for
that CPU, as a user on it would get) and reads the hot loop of the machine code: packed
FMAs on the register class the plan assumes, exactly the plan's steps (``2P`` FMAs per
input channel, ``P`` for the narrow blocks; :data:`numbaconv.cpu._vec.UNROLL` steps per
iteration), none on narrower registers, no scalar FMA, no stack traffic (spill or reload).
Compiling for a CPU needs no such CPU; running it does, so the Intel tuning
(``prefer-256-bit``, which once made LLVM split the AVX-512 plan into ymm halves and spill)
is also *run* here on AVX-512 hosts, with the host's own features.
"""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from numbaconv.cpu import _vec

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 codegen")

#: family -> (NUMBA_CPU_NAME, vector bytes the plan assumes)
FAMILIES = {
    "zen3 (AVX2)": ("znver3", 32),
    "zen4 (AVX-512)": ("znver4", 64),
    "skylake-sp (AVX-512, prefers 256-bit)": ("skylake-avx512", 64),
    "sapphire/emerald rapids (AVX-512, prefers 256-bit)": ("sapphirerapids", 64),
    "haswell (AVX2)": ("haswell", 32),
}
REGISTER = {64: "zmm", 32: "ymm", 16: "xmm"}


def _run(code, tmp_path, **env):
    full = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"), **env)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _report(tmp_path, **env):
    return json.loads(_run("from numbaconv.cpu import asm; import json; print(json.dumps(asm.report()))",
                           tmp_path, **env))


def _check_plan(report, vector_bytes):
    U = _vec.UNROLL  # reduction steps per loop iteration of the register blocks
    assert report["vector_bytes"] == vector_bytes, report["target"]
    reg = REGISTER[vector_bytes]
    assert report["tiled"], "no micro-kernel was reported"
    if vector_bytes == 64:  # the narrow and packed-group blocks (one register per pixel) exist there
        assert any(name.endswith("/NV1") for name in report["tiled"]), report["tiled"]
        assert {name[-2:] for name in report["tiled"] if "/M" in name} == {"M2", "M4"}, report["tiled"]
    for name, stats in report["tiled"].items():
        p_ = int(name.split("/P")[1].split("/")[0])
        nv = int(name.split("/NV")[1].split("/")[0])  # registers per pixel
        # every step's broadcast a load (the packed groups' m-tuples too: vbroadcastsd /
        # vbroadcastf32x4), never a shuffle on the FMA units' port
        assert stats["shuffles"] == 0, f"{name}: {stats}"
        fmas = stats["packed"][reg]
        u = _vec.unroll(nv * p_)  # (28 accumulators: one step per iteration)
        assert fmas == nv * p_ * u, f"{name}: {stats} (plan: {nv * p_} FMAs on {reg} per step, {u} steps)"
        others = {r: n for r, n in stats["packed"].items() if r != reg and n}
        assert not others and not stats["scalar"], f"{name}: FMAs off the plan's {reg}: {stats}"
        assert stats["stack"] == stats["gpr_stack"] == 0, f"{name}: stack traffic in the hot loop: {stats}"
    assert {name.split("/")[1] for name in report["depthwise"]} == {"block4_s1", "sweep_pair_s1", "plane8"}, \
        report["depthwise"]
    for name, stats in report["depthwise"].items():
        if name.endswith("/plane8"):  # the streaming plane block: 8 pixel vectors per tap, U taps per iteration
            assert stats["packed"][reg] == 8 * U and stats["scalar"] == 0, f"{name}: {stats}"
            assert stats["stack"] == stats["gpr_stack"] == 0, f"{name}: stack traffic in the hot loop: {stats}"
            continue
        # NHWC block: 4 pixels x 9 taps per channel vector; NCHW sweep: 2 rows x 9 taps per
        # vector of pixels
        fmas = 36 if "/block4" in name else 18
        assert stats["packed"][reg] == fmas and stats["scalar"] == 0, f"{name}: {stats}"
        # 3 input rows x 6 columns + 9 weight rows of addresses: on AVX2 one integer reload
        # per 36 FMAs (of ~94 instructions) is the price; no vector register may spill
        assert stats["stack"] == 0 and stats["gpr_stack"] <= 2, f"{name}: stack traffic in the hot loop: {stats}"
    assert report["winograd"], "no winograd stage was reported"
    for name, stats in report["winograd"].items():
        others = {r: n for r, n in stats["packed"].items() if r != reg and n}
        assert not others and not stats["scalar"], f"{name}: FMAs off the plan's {reg}: {stats}"
        if "/gemm/" in name:  # tiled's register block over the transformed tiles
            p_ = int(name.split("/P")[1])
            u = _vec.unroll(2 * p_)
            assert stats["packed"][reg] == 2 * p_ * u, f"{name}: {stats} (plan: {2 * p_} FMAs on {reg}, {u} steps)"
            assert stats["stack"] == stats["gpr_stack"] == 0, f"{name}: stack traffic in the hot loop: {stats}"
        else:  # the tile transforms: channel vectors of the full width (1/2, 2, 4, 8 ... as FMAs)
            assert stats["packed"][reg] > 0, f"{name}: {stats}"
    assert report["pointwise"], "no pointwise task was reported"
    for name, stats in report["pointwise"].items():  # tiled's block inlined into the NCHW 1x1 task
        p_ = int(name.split("/P")[1].split("/")[0])
        assert stats["packed"][reg] == 2 * p_ * U and stats["scalar"] == 0, f"{name}: {stats}"
        # P weight-row addresses + the input column + counters outgrow the 15 general registers
        # on some targets (1-3 integer reloads per step on Haswell and Skylake-SP); no vector
        # may spill, and the steps' loads (2 vectors, P broadcasts each, the reloads) must stay
        # within their 2P FMAs (both run two per cycle), so the FMAs still bound the loop
        assert stats["stack"] == 0 and (2 + p_) * U + stats["gpr_stack"] <= 2 * p_ * U, \
            f"{name}: stack traffic in the hot loop: {stats}"
    assert len(report["epilogue"]) == 8, report["epilogue"]
    for name, stats in report["epilogue"].items():  # a pass over values in cache: vector loops
        # no AVX2 masked store (microcoded on AMD: relu's store-back once became one, 3.7x slower)
        assert stats["maskmov"] == 0, f"{name}: {stats}"
        assert stats["packed"]["ymm"] + stats["packed"]["zmm"] > 0, f"{name}: not vectorised: {stats}"
    assert report["dot"], "no dot block was reported"
    for name, stats in report["dot"].items():  # KB x PB accumulators along the reduction
        kb, pb = int(name.split("/KB")[1].split("/")[0]), int(name.split("/PB")[1])
        assert kb * pb + kb + 1 <= (32 if vector_bytes == 64 else 16), f"{name}: the plan needs more registers"
        assert stats["packed"][reg] == kb * pb and stats["scalar"] == 0, f"{name}: {stats}"
        assert stats["stack"] == stats["gpr_stack"] == 0, f"{name}: stack traffic in the hot loop: {stats}"


@pytest.mark.parametrize("family", FAMILIES)
def test_microkernel_plan_for_family(family, tmp_path):
    cpu, vector_bytes = FAMILIES[family]
    _check_plan(_report(tmp_path, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=""), vector_bytes)


def test_microkernel_plan_on_this_host(tmp_path):
    """The host's own default target (what a user here gets)."""
    _check_plan(_report(tmp_path), _vec.target_vector_bytes())


@pytest.mark.skipif(_vec.target_vector_bytes() < 64, reason="running AVX-512 code needs an AVX-512 host")
def test_intel_tuned_code_runs_correctly_on_this_host(tmp_path):
    """Sapphire Rapids' tuning (``prefer-256-bit``) with this host's features: the plan keeps
    zmm, and the convolution it computes equals torch in float64."""
    code = """
        import json
        import numpy as np, torch
        import numbaconv
        from numbaconv.cpu import asm
        rng = np.random.default_rng(0)
        errs = []
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal((2, 40, 9, 23)).astype(dtype)
            w = rng.standard_normal((70, 40, 3, 3)).astype(dtype)
            b = rng.standard_normal(70).astype(dtype)
            exact = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(
                w.astype(np.float64)), torch.from_numpy(b.astype(np.float64)), padding=1).numpy()
            scale = torch.nn.functional.conv2d(torch.from_numpy(np.abs(x).astype(np.float64)), torch.from_numpy(
                np.abs(w).astype(np.float64)), padding=1).numpy() + 1
            for layout in ("NCHW", "NHWC"):
                xa = x if layout == "NCHW" else numbaconv.convert_layout(x, "NCHW", "NHWC")
                y = numbaconv.conv2d(xa, w, b, padding=1, layout=layout, weight_layout="OIHW", algorithm="tiled")
                y = y if layout == "NCHW" else numbaconv.convert_layout(y, "NHWC", "NCHW")
                errs.append(float(np.max(np.abs(y - exact) / scale)))
        print(json.dumps({"report": asm.report(), "errors": errs}))
    """
    out = json.loads(_run(code, tmp_path, NUMBA_CPU_NAME="sapphirerapids"))
    _check_plan(out["report"], 64)
    assert max(out["errors"][:2]) <= 1e-5 and max(out["errors"][2:]) <= 1e-12, out["errors"]


def test_plane_blocks_stay_in_their_rows_on_a_128_bit_target(tmp_path):
    """The streaming kernel's plane blocks step along a row by their own lane count, which
    ``_vec.lanes`` keeps at 4 or more: on a 16-byte (SSE) target float64's blocks hold 4
    lanes, not 16 / 8 = 2, and stepping by 2 wrote past the row -- past the output's end on
    the last one.  Both dtypes, the output followed by sentinels, results against torch."""
    code = """
        import json
        import numpy as np, torch
        import numbaconv
        from numbaconv.cpu._vec import target_vector_bytes
        rng = np.random.default_rng(0)
        rows = []
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal((1, 1, 5, 150)).astype(dtype)
            w = rng.standard_normal((1, 1, 5, 5)).astype(dtype)
            buf = np.full(150 + 64, 7.0, dtype)
            out = buf[:150].reshape(1, 1, 1, 150)  # (one row: the last row is every row's)
            numbaconv.conv2d(x, w, padding=(0, 2), algorithm="tiled", out=out)
            exact = torch.nn.functional.conv2d(torch.from_numpy(x.astype(np.float64)),
                                               torch.from_numpy(w.astype(np.float64)), padding=(0, 2)).numpy()
            rows.append([bool((buf[150:] == 7.0).all()), float(np.max(np.abs(out - exact)))])
        print(json.dumps({"vector_bytes": target_vector_bytes(), "rows": rows}))
    """
    out = json.loads(_run(code, tmp_path, NUMBA_CPU_NAME="nehalem", NUMBA_CPU_FEATURES=""))
    assert out["vector_bytes"] == 16
    (kept32, err32), (kept64, err64) = out["rows"]
    assert kept32 and kept64, out
    assert err32 <= 1e-4 and err64 <= 1e-12, out


def test_target_width_follows_numba_target(tmp_path):
    """The plan's vector width is the compile target's, not the host's CPUID: an AVX2 target
    on an AVX-512 host plans for ymm (it once planned zmm and spilled 23 registers)."""
    out = _run("from numbaconv.cpu import _vec, tiled; import numpy as np; "
               "print(_vec.target_vector_bytes(), tiled.block_width(np.float32))", tmp_path,
               NUMBA_CPU_NAME="x86-64-v3", NUMBA_CPU_FEATURES="")
    assert out.split() == ["32", "16"]
