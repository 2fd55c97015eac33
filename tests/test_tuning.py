"""Per-machine tuning (``numbaconv tune``, :mod:`numbaconv.tuning`): the wisdom file is keyed by
the compile target, knobs reach the planners, stored choices reach ``auto``, results stay
exact, and another CPU or version never reads the file.

(conftest turns wisdom off for the rest of the suite, so a developer's own ``numbaconv tune``
cannot change what the other tests check; these tests turn it on with their own files.)
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import numbaconv
from numbaconv import auto, tuning
from numbaconv.bench import cli
from numbaconv.bench import tune as tune_mod
from numbaconv.cpu import tiled, winograd
from numbaconv.problem import ConvProblem
from reference import torch_conv2d


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBACONV_WISDOM_DIR", str(tmp_path / "wisdom"))
    tuning.enable()
    yield
    tuning.disable()


def check(y, x, w, padding, layout="NCHW"):
    """``y`` against torch in float64, within SPEC's bound 1e-4 * conv(|x|, |w|) (Winograd's too)."""
    if layout == "NHWC":
        y, x, w = y.transpose(0, 3, 1, 2), x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)
    exact = torch_conv2d(x, w, padding=padding)
    bound = 1e-4 * torch_conv2d(np.abs(x), np.abs(w), padding=padding)
    assert y.shape == exact.shape
    assert np.all(np.abs(y - exact) <= bound)


def problem(x, w, **kw):
    return ConvProblem.from_args(x, w, None, **kw)


def arrays(shape_x, shape_w, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape_x).astype(dtype), rng.standard_normal(shape_w).astype(dtype)


def test_no_wisdom_means_defaults():
    assert tuning.wisdom() is None
    assert not os.path.exists(tuning.wisdom_path())
    for name, knob in tuning.KNOBS.items():
        assert tuning.value(name) == knob.default
        assert knob.default in knob.candidates


def test_path_is_keyed_by_the_compile_target():
    triple, cpu, features = tuning.target_key()
    path = tuning.wisdom_path()
    assert path.startswith(os.environ["NUMBACONV_WISDOM_DIR"])
    assert os.path.basename(path).startswith(cpu)
    code = "import numbaconv.tuning as t; print(t.wisdom_path()); print(t.target_key()[1])"
    env = dict(os.environ, NUMBA_CPU_NAME="skylake-avx512", NUMBA_CPU_FEATURES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    other_path, other_cpu = out.stdout.split()
    assert other_cpu == "skylake-avx512"
    if cpu != "skylake-avx512":
        assert other_path != path


def test_another_target_never_reads_the_file():
    """The file names this CPU's target; one copied to (or named for) another is ignored."""
    path = tuning.save({"tiled.cb_bytes": 64 << 10}, {})
    assert tuning.value("tiled.cb_bytes") == 64 << 10
    code = ("import os, numbaconv.tuning as t; print(t.load(os.environ['WISDOM_FILE']) is None, "
            "t.value('tiled.cb_bytes'))")
    env = dict(os.environ, NUMBACONV_WISDOM="1", WISDOM_FILE=path)
    same = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert same.stdout.split() == ["False", str(64 << 10)]  # this target: read
    cpu = "znver3" if tuning.target_key()[1] != "znver3" else "skylake-avx512"
    env.update(NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="+avx2,+fma,+avx,+sse4.2")
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert other.stdout.split() == ["True", str(tuning.KNOBS["tiled.cb_bytes"].default)]  # another: never


def test_another_version_or_format_is_ignored(tmp_path):
    path = tuning.save({"tiled.cb_bytes": 64 << 10}, {})
    data = json.loads(open(path).read())
    for change in ({"numbaconv": "0.0.0-other"}, {"format": tuning.FORMAT + 1}):
        other = tmp_path / "other.json"
        other.write_text(json.dumps(dict(data, **change)))
        assert tuning.load(str(other)) is None
        assert tuning.value("tiled.cb_bytes") == tuning.KNOBS["tiled.cb_bytes"].default


def test_unreadable_file_warns_and_keeps_the_defaults():
    os.makedirs(os.path.dirname(tuning.wisdom_path()), exist_ok=True)
    with open(tuning.wisdom_path(), "w") as f:
        f.write("{not json")
    with pytest.warns(RuntimeWarning, match="unreadable wisdom"):
        assert tuning.load() is None
    assert tuning.value("tiled.band_bytes") == tuning.KNOBS["tiled.band_bytes"].default


def test_disabled_by_environment(tmp_path):
    tuning.save({"tiled.cb_bytes": 64 << 10}, {})
    code = "import numbaconv.tuning as t; print(t.wisdom() is None, t.value('tiled.cb_bytes'))"
    env = dict(os.environ, NUMBACONV_WISDOM="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", str(tuning.KNOBS["tiled.cb_bytes"].default)]
    env["NUMBACONV_WISDOM"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", str(64 << 10)]


def test_override_rejects_unknown_knobs():
    with pytest.raises(ValueError, match="unknown tuning knob"):
        with tuning.override({"tiled.cb": 1}):
            pass


def test_tiled_channel_block_knob_reaches_the_plan_and_stays_exact():
    x, w = arrays((1, 64, 9, 9), (32, 64, 3, 3))
    p = problem(x, w, padding=1)
    default = tiled.plan(p)
    assert default["cb"] == p.cg  # one channel block by default
    tuning.save({"tiled.cb_bytes": min(tuning.KNOBS["tiled.cb_bytes"].candidates) // 4}, {})
    small = tiled.plan(p)
    assert small["cb"] < p.cg  # several blocks: partial sums added into the output
    y = numbaconv.conv2d(x, w, padding=1, algorithm="tiled")
    check(y, x, w, 1)


def test_pixel_block_knob_forces_each_register_block_of_the_target():
    x, w = arrays((1, 16, 13, 13), (32, 16, 3, 3))
    p = problem(x, w, padding=1)
    for choice in tiled.P_CHOICES[tiled.vector_bytes()]:
        with tuning.override({"tiled.pixel_block": choice}):
            assert tiled.plan(p)["P"] == choice
            check(numbaconv.conv2d(x, w, padding=1, algorithm="tiled"), x, w, 1)
    with tuning.override({"tiled.pixel_block": 5}):  # no such micro-kernel: the default rule
        assert tiled.plan(p)["P"] == tiled.pixel_block(p.wo)


def test_band_knob_changes_the_row_bands():
    x, w = arrays((1, 64, 40, 40), (32, 64, 3, 3))
    p = problem(x, w, padding=1)
    rows = {}
    for value in (4 << 10, 1 << 40):
        with tuning.override({"tiled.band_bytes": value}):
            rows[value] = tiled.plan(p)["rows"]
            y = numbaconv.conv2d(x, w, padding=1, algorithm="tiled")
            check(y, x, w, 1)
    assert rows[4 << 10] < rows[1 << 40]


@pytest.mark.parametrize("threshold,in_place", [(0, False), (1 << 40, True)])
def test_hwio_in_place_knob(threshold, in_place):
    # NHWC, HWIO, K * 4 = 1 KiB; a block's 9 * 8 rows of V weights under 16 KiB (V = 32 too)
    x, w = arrays((1, 6, 6, 8), (3, 3, 8, 256))
    p = problem(x, w, padding=1, layout="NHWC")
    with tuning.override({"tiled.hwio_inplace_bytes": threshold}):
        assert tiled.plan(p)["hwio"] is in_place
        y = numbaconv.conv2d(x, w, padding=1, layout="NHWC", algorithm="tiled")
    check(y, x, w, 1, layout="NHWC")


def test_hwio_in_place_only_for_small_blocks():
    """Whatever the K threshold, a block whose R * S * C/G weight rows exceed
    HWIO_INPLACE_BLOCK_BYTES is packed (rows read in place K * itemsize apart crowd a few
    cache sets per page: their speed depended on the pages' physical placement)."""
    x, w = arrays((1, 6, 6, 64), (3, 3, 64, 32))
    p = problem(x, w, padding=1, layout="NHWC")
    assert 9 * 64 * tiled.block_width(np.float32) * 4 > tiled.HWIO_INPLACE_BLOCK_BYTES
    assert w.nbytes >= 64 << 10  # (smaller weights would be packed on every call: read in place)
    with tuning.override({"tiled.hwio_inplace_bytes": 1 << 40}):
        assert tiled.plan(p)["hwio"] is False
        y = numbaconv.conv2d(x, w, padding=1, layout="NHWC", algorithm="tiled")
    check(y, x, w, 1, layout="NHWC")
    x1, w1 = arrays((1, 6, 6, 64), (1, 1, 64, 32))  # a 1x1 layer's block: 64 rows
    x2, w2 = arrays((1, 6, 6, 32), (3, 3, 32, 32))  # 36 KiB of weights: not cached, so in place
    with tuning.override({"tiled.hwio_inplace_bytes": 1 << 40}):
        assert tiled.plan(problem(x1, w1, layout="NHWC"))["hwio"] is True
        assert tiled.plan(problem(x2, w2, padding=1, layout="NHWC"))["hwio"] is True


def test_winograd_knobs_reach_its_plan():
    x, w = arrays((1, 64, 24, 24), (64, 64, 3, 3))
    p = problem(x, w, padding=1)
    with tuning.override({"winograd.cb_bytes": 16 << 10, "winograd.m_bytes": 16 << 10}):
        small = winograd.plan(p)
        y = numbaconv.conv2d(x, w, padding=1, algorithm="winograd")
    big = winograd.plan(p)
    assert small["cb"] < big["cb"] and small["kbr"] <= big["kbr"]
    check(y, x, w, 1)


def test_winograd_threshold_knob_moves_auto():
    # 8 input channels: under the default threshold; 24 output channels: more than tiled's
    # narrow blocks take (K <= V/2: 16 on AVX-512), which Winograd leaves to tiled
    x, w = arrays((1, 8, 20, 20), (24, 8, 3, 3))
    p = problem(x, w, padding=1)
    assert tuning.KNOBS["auto.winograd_min_channels"].default > p.cg
    assert auto.choose(p) != "winograd"
    with tuning.override({"auto.winograd_min_channels": p.cg}):
        assert auto.choose(p) == "winograd"
        check(numbaconv.conv2d(x, w, padding=1), x, w, 1)


def test_a_stored_choice_reaches_auto():
    x, w = arrays((1, 16, 12, 12), (24, 16, 3, 3))
    p = problem(x, w, padding=1)
    heuristic = auto.heuristic(p)
    other = next(a for a in auto.candidates(p) if a != heuristic)
    tuning.save({}, {tuning.problem_key(p): other})
    assert auto.choose(p) == other
    # exactly that geometry: another padding keeps the heuristic
    q = problem(x, w, padding=0)
    assert auto.choose(q) == auto.heuristic(q)
    y = numbaconv.conv2d(x, w, padding=1)
    check(y, x, w, 1)


def test_plan_choices_are_stored_apart_from_conv2d_choices(monkeypatch):
    """A Conv2dPlan's weights are prepared once: its best algorithm can differ from conv2d's."""
    x, w = arrays((1, 16, 12, 12), (24, 16, 3, 3))
    p = problem(x, w, padding=1)
    heuristic = auto.heuristic(p)
    other = next(a for a in auto.candidates(p) if a != heuristic)
    tuning.save({}, {tuning.problem_key(p, prepared=True): other})
    assert auto.choose(p) == heuristic
    assert auto.choose(p, prepared=True) == other
    picked = []
    real_choose = auto.choose

    def spy(q, prepared=False):
        picked.append(real_choose(q, prepared))
        return picked[-1]
    monkeypatch.setattr(auto, "choose", spy)
    plan = numbaconv.Conv2dPlan(w, None, padding=1)
    check(plan(x), x, w, 1)
    assert picked == [other]  # the plan asked for the prepared-weights choice
    check(numbaconv.conv2d(x, w, padding=1), x, w, 1)
    assert picked == [other, heuristic]


def test_a_stored_choice_that_does_not_apply_is_ignored():
    x, w = arrays((1, 16, 12, 12), (24, 16, 5, 5))
    p = problem(x, w, padding=2)
    tuning.save({}, {tuning.problem_key(p): "winograd"})  # Winograd runs 3x3 only
    assert auto.choose(p) == auto.heuristic(p)


def test_winograd_switch_beats_a_stored_winograd_choice(monkeypatch):
    x, w = arrays((1, 32, 20, 20), (32, 32, 3, 3))
    p = problem(x, w, padding=1)
    tuning.save({}, {tuning.problem_key(p): "winograd"})
    assert auto.choose(p) == "winograd"
    monkeypatch.setattr(auto, "winograd", False)
    assert auto.choose(p) != "winograd"


def test_tune_measures_and_writes_wisdom(tmp_path):
    """A small real run: one knob on one layer, choices on it; the file it writes is read back."""
    layer = (1, 256, 6, 6, 32, 3, 3, 1, 1)  # 256 channels: one, two or three channel blocks
    report = tune_mod.tune([layer], suite=False, layouts=("NHWC",), knobs=["tiled.cb_bytes"], rounds=1,
                           budget_s=0.0)
    k = report["knobs"]["tiled.cb_bytes"]
    assert k["layers"] == 1
    assert set(k["ratios"]) == {str(v) for v in tuning.KNOBS["tiled.cb_bytes"].candidates}
    assert k["ratios"][str(k["default"])] == 1.0
    assert k["chosen"] in tuning.KNOBS["tiled.cb_bytes"].candidates
    x, w = arrays((1, 6, 6, 256), (3, 3, 256, 32))
    p = problem(x, w, padding=1, layout="NHWC")
    assert set(report["layers"]) == {tuning.problem_key(p), tuning.problem_key(p, prepared=True)}  # conv2d, plan
    for key, row in report["layers"].items():
        assert set(row["ms"]) == set(auto.candidates(p))
        assert row["stored"] == (key in report["choices"])
        assert row["stored"] == (row["best"] != row["heuristic"]
                                 and row["ms"][row["best"]] < (1 - tune_mod.MARGIN) * row["ms"][row["heuristic"]])
    assert report["path"] == tuning.wisdom_path()
    data = json.loads(open(report["path"]).read())
    assert (data["target"]["triple"], data["target"]["cpu"], data["target"]["features"]) == tuning.target_key()
    assert data["choices"] == report["choices"]
    w = tuning.wisdom()
    assert w is not None and w["choices"] == report["choices"]
    text = tune_mod.format_report(report)
    assert "tiled.cb_bytes" in text and report["path"] in text


def test_tune_rejects_bad_arguments():
    with pytest.raises(ValueError, match="knobs must name"):
        tune_mod.tune(suite=False, layers=[(1, 4, 6, 6, 4, 3, 3)], knobs=["nope"], write=False)
    with pytest.raises(ValueError, match="nothing to tune"):
        tune_mod.tune(suite=False, write=False)
    with pytest.raises(ValueError, match="rounds"):
        tune_mod.tune(suite="tiny", rounds=0, write=False)


def test_cli_show_tune_and_forget(tmp_path, capsys):
    assert cli.main(["tune", "--show"]) == 0
    assert "no wisdom" in capsys.readouterr().out
    out_file = tmp_path / "w.json"
    assert cli.main(["tune", "--suite", "tiny", "--layouts", "NCHW", "--knobs", "tiled.band_bytes",
                     "--rounds", "1", "--output", str(out_file)]) == 0
    text = capsys.readouterr().out
    assert "tiled.band_bytes" in text and str(out_file) in text
    assert json.loads(out_file.read_text())["target"]["cpu"] == tuning.target_key()[1]
    tuning.save({}, {})
    assert cli.main(["tune", "--show"]) == 0
    assert tuning.wisdom_path() in capsys.readouterr().out
    assert cli.main(["tune", "--forget"]) == 0
    assert "deleted" in capsys.readouterr().out
    assert tuning.wisdom() is None


def test_wisdom_is_keyed_on_the_released_version():
    """The key reads numbaconv.__version__ (cheap); it must be the version pip installs, so
    an upgrade never reads the previous release's wisdom."""
    import pathlib
    import tomllib
    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert tuning._version() == numbaconv.__version__ == pyproject["project"]["version"]
