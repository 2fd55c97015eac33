"""Every error in the contract: the right type, raised before any work, naming the argument and value."""

import dataclasses
import re
import types

import numpy as np
import pytest

import numbaconv

X = np.zeros((1, 4, 6, 6), np.float32)
W = np.zeros((2, 4, 3, 3), np.float32)


def call(**overrides):
    args = dict(x=X, weight=W, bias=None)
    args.update(overrides)
    return numbaconv.conv2d(args.pop("x"), args.pop("weight"), args.pop("bias"), **args)


TYPE_ERRORS = [
    ("x_list", dict(x=X.tolist()), r"x must be a numpy.ndarray, got list"),
    ("weight_none", dict(weight=None), r"weight must be a numpy.ndarray, got NoneType"),
    ("bias_list", dict(bias=[0.0, 0.0]), r"bias must be a numpy.ndarray, got list"),
    ("x_int", dict(x=X.astype(np.int32), weight=W.astype(np.int32)), r"x has dtype int32"),
    ("x_float16", dict(x=X.astype(np.float16), weight=W.astype(np.float16)), r"x has dtype float16"),
    ("weight_mismatch", dict(weight=W.astype(np.float64)), r"weight has dtype float64 but x has dtype float32"),
    ("bias_mismatch", dict(bias=np.zeros(2, np.float64)), r"bias has dtype float64 but x has dtype float32"),
    ("out_list", dict(out=[1]), r"out must be None or a numpy.ndarray, got list"),
    ("out_dtype", dict(out=np.zeros((1, 2, 4, 4), np.float64)), r"out has dtype float64"),
]

VALUE_ERRORS = [
    ("x_2d", dict(x=X[0, 0]), r"x must be 4-D \(NCHW\) or 3-D \(one unbatched image\), got shape \(6, 6\)"),
    ("x_5d", dict(x=X[None]), r"x must be 4-D .* or 3-D .*\(1, 1, 4, 6, 6\)"),
    ("weight_5d", dict(weight=W[None]), r"weight must be 4-D .*\(1, 2, 4, 3, 3\)"),
    ("channel_mismatch", dict(weight=np.zeros((2, 3, 3, 3), np.float32)), r"weight shape \(2, 3, 3, 3\).*I=3.*C=4"),
    ("groups_not_dividing", dict(groups=3), r"groups=3 must divide.*C=4.*K=2"),
    ("groups_zero", dict(groups=0), r"groups must be an int >= 1, got 0"),
    ("groups_float", dict(groups=2.0), r"groups must be an int >= 1, got 2.0"),
    ("kernel_too_large", dict(weight=np.zeros((2, 4, 7, 3), np.float32)), r"kernel of size \(7, 3\).*padded input \(6, 6\)"),
    ("dilated_kernel_too_large", dict(dilation=3), r"dilation \(3, 3\) spans \(7, 7\)"),
    ("stride_zero", dict(stride=0), r"stride must be >= 1, got 0"),
    ("stride_pair_negative", dict(stride=(1, -2)), r"stride must be >= 1, got \(1, -2\)"),
    ("stride_string", dict(stride="2"), r"stride must be an int or a pair of ints, got '2'"),
    ("stride_triple", dict(stride=(1, 1, 1)), r"stride must be an int or a pair of ints, got \(1, 1, 1\)"),
    ("dilation_zero", dict(dilation=(0, 1)), r"dilation must be >= 1, got \(0, 1\)"),
    ("padding_negative", dict(padding=-1), r"padding must be >= 0, got -1"),
    ("padding_pairs_negative", dict(padding=((1, -1), (0, 0))), r"padding must be >= 0, got \(1, -1\)"),
    ("padding_unknown_string", dict(padding="full"), r"padding must be .*'same'; got 'full'"),
    ("padding_float", dict(padding=1.5), r"padding must be an int or a pair of ints, got 1.5"),
    ("padding_mode", dict(padding=1, padding_mode="mirror"), r"padding_mode must be one of .*got 'mirror'"),
    ("reflect_too_large", dict(padding=6, padding_mode="reflect"), r"padding=6 with padding_mode='reflect'"),
    ("circular_too_large", dict(padding=(0, 7), padding_mode="circular"), r"padding=\(0, 7\) with padding_mode='circular'"),
    ("layout", dict(layout="CHWN"), r"layout must be one of \('NCHW', 'NHWC'\), got 'CHWN'"),
    ("weight_layout", dict(weight_layout="IOHW"), r"weight_layout must be one of .*got 'IOHW'"),
    ("algorithm", dict(algorithm="fft"), r"algorithm must be 'auto' or one of .*got 'fft'"),
    ("bias_shape", dict(bias=np.zeros(3, np.float32)), r"bias must have shape \(2,\).*got \(3,\)"),
    ("bias_2d", dict(bias=np.zeros((2, 1), np.float32)), r"bias must have shape \(2,\).*got \(2, 1\)"),
    ("out_shape", dict(out=np.zeros((1, 2, 5, 4), np.float32)), r"out has shape \(1, 2, 5, 4\) but the result has shape \(1, 2, 4, 4\)"),
    ("out_not_contiguous", dict(out=np.zeros((1, 2, 4, 8), np.float32)[..., ::2]), r"out must be C-contiguous"),
    ("zero_channels", dict(x=np.zeros((1, 0, 6, 6), np.float32), weight=np.zeros((2, 0, 3, 3), np.float32)), r"non-zero channels"),
]


@pytest.mark.parametrize("overrides,pattern", [c[1:] for c in TYPE_ERRORS], ids=[c[0] for c in TYPE_ERRORS])
def test_type_errors(overrides, pattern):
    with pytest.raises(TypeError, match=pattern):
        call(**overrides)


@pytest.mark.parametrize("overrides,pattern", [c[1:] for c in VALUE_ERRORS], ids=[c[0] for c in VALUE_ERRORS])
def test_value_errors(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**overrides)


def test_out_sharing_memory_with_input_is_refused():
    x = np.zeros((1, 2, 4, 4), np.float32)
    w = np.zeros((2, 2, 1, 1), np.float32)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        numbaconv.conv2d(x, w, out=x)


def test_errors_raised_before_any_work(monkeypatch):
    """Validation happens before any kernel runs: a failing argument never reaches the registry."""
    from numbaconv import registry

    def boom(*args, **kwargs):
        raise AssertionError("kernel ran before validation")

    for name, algo in list(registry.REGISTRY.items()):
        fake = types.SimpleNamespace(run=boom, WEIGHT_LAYOUTS=tuple(algo.weight_layouts.items()))
        monkeypatch.setitem(registry.REGISTRY, name, dataclasses.replace(algo, module=fake))
    with pytest.raises(ValueError, match="stride"):
        numbaconv.conv2d(X, W, stride=0, algorithm="naive")
    with pytest.raises(ValueError, match="out has shape"):
        numbaconv.conv2d(X, W, out=np.zeros((1, 2, 3, 3), np.float32), algorithm="naive")


def test_im2col_col2im_errors():
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        numbaconv.im2col([1, 2], 3)
    with pytest.raises(ValueError, match=r"x must be 4-D"):
        numbaconv.im2col(np.zeros((2, 3, 4), np.float32), 3)
    with pytest.raises(ValueError, match=r"kernel_size must be >= 1, got 0"):
        numbaconv.im2col(X, 0)
    with pytest.raises(ValueError, match=r"kernel_size 7 .* padded height 6"):
        numbaconv.im2col(X, 7)
    with pytest.raises(ValueError, match=r"cols has 10 rows, not a multiple of kernel_size 3x3=9"):
        numbaconv.col2im(np.zeros((1, 10, 16), np.float32), (6, 6), 3)
    with pytest.raises(ValueError, match=r"cols has 15 blocks .* gives 4x4=16"):
        numbaconv.col2im(np.zeros((1, 9, 15), np.float32), (6, 6), 3)


def test_convert_layout_errors():
    a = np.zeros((1, 2, 3, 4))
    with pytest.raises(ValueError, match=re.escape("src='NCHW' and dst='NCHX' must be permutations")):
        numbaconv.convert_layout(a, "NCHW", "NCHX")
    with pytest.raises(ValueError, match=re.escape("a has 4 dimensions but src='HWO' names 3")):
        numbaconv.convert_layout(a, "HWO", "OHW")
    with pytest.raises(ValueError, match=re.escape("src='NNHW' repeats an axis letter")):
        numbaconv.convert_layout(a, "NNHW", "NHWN")


@pytest.mark.parametrize("valid,invalid,pattern", [
    (dict(stride=2), dict(stride=2.0), r"stride must be an int or a pair of ints, got 2.0"),
    (dict(groups=1), dict(groups=1.0), r"groups must be an int >= 1, got 1.0"),
    (dict(padding=(1, 1)), dict(padding=(1.0, 1)), r"padding must be an int or a pair of ints, got \(1.0, 1\)"),
    (dict(dilation=1), dict(dilation=True), r"dilation must be an int or a pair of ints, got True"),
])
def test_errors_still_raised_after_an_equal_valid_call(valid, invalid, pattern):
    """The front door remembers accepted arguments (``ConvProblem.from_args_cached``); values
    equal to accepted ones but of another type (1.0 == 1 == True) must still be refused."""
    call(**valid)
    call(**valid)
    with pytest.raises(ValueError, match=pattern):
        call(**invalid)


def test_accepted_arguments_are_parsed_once(monkeypatch):
    from numbaconv import problem
    from numbaconv.problem import ConvProblem
    monkeypatch.setattr(problem, "_ACCEPTED", {})
    real = ConvProblem.from_args.__func__
    parsed = []
    monkeypatch.setattr(ConvProblem, "from_args", classmethod(lambda cls, *a, **k: parsed.append(1) or real(cls, *a, **k)))
    x = np.zeros((1, 4, 7, 7), np.float32)
    numbaconv.conv2d(x, W, padding=(1, 2))
    numbaconv.conv2d(x + 1, W, padding=(1, 2))  # same shapes and arguments: no parse
    numbaconv.conv2d(x, W, padding=[1, 2])  # a list is not keyed: parsed every time
    numbaconv.conv2d(x, W, padding=[1, 2])
    assert len(parsed) == 3
    assert numbaconv.conv2d(x, W, padding=(1, 2)).shape == (1, 2, 7, 9)
