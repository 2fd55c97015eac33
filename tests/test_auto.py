"""``auto``'s choices on representative problems (the table in numbaconv/auto.py).

The expected choices come from timing the public suite (see numbaconv/auto.py); these
tests pin the heuristic so a change to it is deliberate.
"""

import numpy as np
import pytest

import numbaconv
from numbaconv import auto, tuning
from numbaconv.problem import ConvProblem
from reference import assert_close, torch_conv2d


def prob(n, c, hw, k, rs, stride=1, pad=0, groups=1, layout="NCHW", dtype=np.float32):
    return ConvProblem(n=n, c=c, h=hw, w=hw, k=k, r=rs, s=rs, stride_h=stride, stride_w=stride,
                       pad_top=pad, pad_bottom=pad, pad_left=pad, pad_right=pad, groups=groups,
                       layout=layout, weight_layout="OIHW" if layout == "NCHW" else "HWIO",
                       dtype=np.dtype(dtype))


# name: (problem args, expected NCHW, expected NHWC)
SUITE = {
    "seed_notebook": ((3, 3, 1000, 3, 3, 1, 0, 1), "tiled", "tiled"),
    "resnet_conv1": ((1, 3, 224, 64, 7, 2, 3, 1), "tiled", "tiled"),
    "resnet_res2_3x3": ((1, 64, 56, 64, 3, 1, 1, 1), "winograd", "winograd"),
    "resnet_res2_1x1": ((1, 64, 56, 256, 1, 1, 0, 1), "tiled", "im2col"),
    "resnet_res3_1x1_s2": ((1, 256, 56, 128, 1, 2, 0, 1), "tiled", "im2col"),
    "resnet_res4_3x3": ((1, 256, 14, 256, 3, 1, 1, 1), "winograd", "winograd"),
    "resnet_res5_3x3": ((1, 512, 7, 512, 3, 1, 1, 1), "winograd", "winograd"),
    "vgg_3x3": ((1, 64, 112, 128, 3, 1, 1, 1), "winograd", "winograd"),
    "batch8_3x3": ((8, 64, 56, 64, 3, 1, 1, 1), "winograd", "winograd"),
    "mobilenet_dw_s1": ((1, 32, 112, 32, 3, 1, 1, 32), "tiled", "tiled"),
    "mobilenet_dw_s2": ((1, 64, 112, 64, 3, 2, 1, 64), "tiled", "tiled"),
    "mobilenet_dw_14": ((1, 512, 14, 512, 3, 1, 1, 512), "tiled", "tiled"),
}


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name", sorted(SUITE))
def test_choice_on_public_suite(name, layout):
    args, nchw, nhwc = SUITE[name]
    if nhwc == "im2col" and tuning.intel_avx512():  # (tiled's 1x1 beat BLAS there: auto._nhwc_gemm_in_tiled)
        nhwc = "tiled"
    assert auto.choose(prob(*args, layout=layout)) == (nchw if layout == "NCHW" else nhwc)


def test_choice_is_always_available():
    for args, _, _ in SUITE.values():
        for layout in ("NCHW", "NHWC"):
            assert auto.choose(prob(*args, layout=layout)) in numbaconv.algorithms()


def test_grouped_non_depthwise_goes_to_tiled():
    assert auto.choose(prob(1, 64, 28, 64, 3, 1, 1, groups=8)) == "tiled"  # 8 channels per group
    assert auto.choose(prob(1, 64, 28, 64, 5, 1, 2, groups=4)) == "tiled"  # 5x5: no Winograd


def test_winograd_choices_and_switch(monkeypatch):
    """Stride-1 3x3 layers with 16+ channels per group and enough tiles go to Winograd;
    RGB inputs, strided or dilated layers and 4x4 outputs at batch 1 stay direct; the
    switch (``auto.winograd``, ``NUMBACONV_WINOGRAD=0``) turns it off.  16 channels per group
    fill only half of Winograd's GEMM blocks where tiled has its narrow blocks (AVX-512)."""
    from numbaconv.cpu import tiled
    assert auto.choose(prob(1, 64, 28, 64, 3, 1, 1, groups=2)) == "winograd"
    assert auto.choose(prob(1, 64, 28, 64, 3, 1, 1, groups=4)) == (
        "tiled" if tiled.narrow_blocks(np.float32, 16) else "winograd")
    assert auto.choose(prob(1, 3, 224, 64, 3, 1, 1)) == "tiled"
    assert auto.choose(prob(1, 64, 56, 64, 3, 2, 1)) == "tiled"
    assert auto.choose(prob(1, 512, 4, 512, 3, 1, 1)) == "tiled"
    assert auto.choose(prob(1, 64, 56, 64, 3, 1, 1, dtype=np.float64)) == "winograd"
    assert auto.choose(prob(1, 64, 56, 64, 3, 1, 1)) == "winograd"
    monkeypatch.setattr(auto, "winograd", False)  # (choose remembers answers: not past the switch)
    assert auto.choose(prob(1, 64, 56, 64, 3, 1, 1)) == "tiled"
    assert "winograd" not in auto.candidates(prob(1, 64, 56, 64, 3, 1, 1))


def test_winograd_environment_switch():
    import subprocess
    import sys
    code = ("from numbaconv import auto; from numbaconv.problem import ConvProblem; import numpy as np\n"
            "p = ConvProblem(n=1, c=64, h=56, w=56, k=64, r=3, s=3, stride_h=1, stride_w=1, pad_top=1, "
            "pad_bottom=1, pad_left=1, pad_right=1, groups=1, layout='NCHW', weight_layout='OIHW', "
            "dtype=np.dtype(np.float32))\n"
            "print(auto.winograd, auto.choose(p))")
    for value, expected in (("0", "False tiled"), ("1", "True winograd")):
        env = dict(__import__("os").environ, NUMBACONV_WINOGRAD=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split()


def test_thin_1x1_gemms_go_to_tiled():
    """The 1x1 rule's exception (the table in numbaconv/auto.py): NHWC batches of 7x7 images."""
    assert auto.choose(prob(1, 960, 7, 320, 1, layout="NHWC")) == "tiled"
    assert auto.choose(prob(1, 2048, 7, 512, 1, layout="NHWC")) == "tiled"
    assert auto.choose(prob(2, 2048, 7, 512, 1, layout="NHWC")) == "tiled"  # 98 pixels
    wide = "tiled" if tuning.intel_avx512() else "im2col"  # (every NHWC 1x1 there: auto._nhwc_gemm_in_tiled)
    assert auto.choose(prob(8, 2048, 7, 512, 1, layout="NHWC")) == wide  # 392 pixels
    assert auto.choose(prob(1, 576, 14, 96, 1, layout="NHWC")) == wide  # 196 pixels
    assert auto.choose(prob(1, 1024, 14, 256, 1, stride=2, layout="NHWC")) == "tiled"  # strided: 7x7 out


def test_nhwc_1x1_rule_follows_the_target():
    """On Intel AVX-512 targets every NHWC 1x1 layer runs tiled's register blocks; compiled for
    AVX2 (Zen 3) or Zen 4 the wide ones stay with BLAS (a fresh process per target)."""
    import subprocess
    import sys
    code = ("from numbaconv import auto, tuning; from numbaconv.problem import ConvProblem\n"
            "p = ConvProblem(n=1, c=64, h=56, w=56, k=256, r=1, s=1, layout='NHWC', weight_layout='HWIO')\n"
            "print(tuning.intel_avx512(), auto.choose(p))")
    for cpu, features, expected in (("znver3", "", "False im2col"), ("znver4", "", "False im2col"),
                                    ("sapphirerapids", "", "True tiled")):
        env = dict(__import__("os").environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split(), (cpu, out.stdout)


def test_nchw_1x1_gemms_go_to_tiled_unless_the_images_are_tiny():
    """NCHW stride-1 1x1 layers run tiled's GEMM on the input in place (numbaconv.cpu.pointwise)
    from 7x7 images on, at any batch; 4x4 and 1x1 images (squeeze-and-excitation) stay with BLAS."""
    assert auto.choose(prob(1, 576, 14, 96, 1)) == "tiled"
    assert auto.choose(prob(1, 2048, 7, 512, 1)) == "tiled"
    assert auto.choose(prob(8, 96, 56, 24, 1)) == "tiled"
    assert auto.choose(prob(1, 24, 112, 144, 1)) == "tiled"
    assert auto.choose(prob(1, 960, 1, 240, 1)) == "im2col"
    assert auto.choose(prob(8, 960, 4, 240, 1)) == "im2col"
    assert auto.choose(prob(1, 64, 14, 64, 1, groups=2)) == "im2col"


def test_padded_or_dilated_1x1_is_not_treated_as_a_plain_gemm():
    assert auto.choose(prob(1, 64, 28, 64, 1, 1, 1)) == "tiled"
    assert auto.choose(prob(1, 64, 28, 64, 1, 2, 0, layout="NCHW")) == "tiled"


def test_without_tiled_falls_back(monkeypatch):
    monkeypatch.setattr(auto, "usable", lambda name: name in ("naive", "im2col"))
    assert auto.choose(prob(1, 64, 56, 64, 3, 1, 1)) == "im2col"
    assert auto.choose(prob(1, 1, 50, 3, 3)) == "naive"  # a 9-term reduction: memory-bound


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_auto_result_matches_torch(layout):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 40, 6, 6)).astype(np.float32)
    w = rng.standard_normal((48, 40, 3, 3)).astype(np.float32)
    b = rng.standard_normal(48).astype(np.float32)
    expected = torch_conv2d(x, w, b, padding=1)
    if layout == "NHWC":
        got = numbaconv.conv2d(np.ascontiguousarray(x.transpose(0, 2, 3, 1)),
                               np.ascontiguousarray(w.transpose(2, 3, 1, 0)), b, padding=1, layout="NHWC")
        got = got.transpose(0, 3, 1, 2)
    else:
        got = numbaconv.conv2d(x, w, b, padding=1)
    assert_close(got, expected, np.float32, 40 * 9)


def test_measured_choice_is_opt_in_cached_and_correct(monkeypatch):
    """``auto.benchmark = True``: the first call per geometry times the candidates on its
    own arrays, later calls run the cached winner; results stay torch's."""
    from numbaconv import api
    monkeypatch.setattr(auto, "benchmark", True)
    auto.forget_measurements()
    runs = []
    real_run = api._run
    monkeypatch.setattr(api, "_run", lambda name, *a: runs.append(name) or real_run(name, *a))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 5, 9, 8))
    w = rng.standard_normal((6, 5, 3, 3))
    b = rng.standard_normal(6)
    got = numbaconv.conv2d(x, w, b, padding=1)
    assert_close(got, torch_conv2d(x, w, b, padding=1), np.float64, 45)
    (p, choice), = auto.measured.items()
    assert choice in auto.candidates(p) and set(auto.candidates(p)) == {"naive", "im2col", "tiled", "winograd"}
    assert len(runs) == len(auto.candidates(p)) * (1 + auto.BENCHMARK_REPEATS) + 1 and runs[-1] == choice
    runs.clear()
    assert_close(numbaconv.conv2d(x, w, b, padding=1), torch_conv2d(x, w, b, padding=1), np.float64, 45)
    assert runs == [choice]  # measured once per geometry
    numbaconv.conv2d(x[..., :7], w, b, padding=1)  # another geometry: measured again
    assert len(auto.measured) == 2
    auto.forget_measurements()
    assert not auto.measured


def test_measured_choice_skips_naive_on_real_layers():
    assert "naive" not in auto.candidates(prob(1, 64, 56, 64, 3, 1, 1))
