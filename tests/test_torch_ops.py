"""numbaconv.torch as a torch operator, proven by torch's own test inputs.

* torch's OpInfo sample inputs for ``nn.functional.conv2d`` / ``conv_transpose2d`` (float32 and
  float64, batched and unbatched; also channels-last and through the NumPy API in NHWC) and
  its error inputs; ModuleInfo inputs for ``nn.Conv2d`` / ``nn.ConvTranspose2d`` (outputs,
  input and parameter gradients, train and eval).  The oracle is torch's own function in
  float64.
* ``torch.library.opcheck`` for every ``numbaconv::`` operator (schema, fake implementation,
  autograd registration, AOT dispatch with dynamic shapes).
* ``torch.compile(fullgraph=True)`` (forward and backward, static and dynamic shapes) with no
  graph break, ``torch.export``, and the eager path equal to the operator.
torch is pinned (pyproject), so its private ``torch.testing._internal`` stays as used here.
"""

import copy

import cuda_sim
import numpy as np
import pytest
import torch
import torch.nn.functional as F

cuda_sim.bind()  # torch's testing package imports numba.cuda: bind it as test_cuda.py needs it first

from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

import numbaconv
import numbaconv.torch as nct
from numbaconv.torch import ops

torch.set_num_threads(2)

OPS = {"nn.functional.conv2d": (nct.conv2d, F.conv2d, numbaconv.conv2d),
       "nn.functional.conv_transpose2d": (nct.conv_transpose2d, F.conv_transpose2d, numbaconv.conv_transpose2d)}
OPINFOS = {o.name: o for o in op_db if o.name in OPS and not o.variant_test_name}
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _samples(name, dtype, requires_grad=False):
    return list(OPINFOS[name].sample_inputs("cpu", dtype, requires_grad=requires_grad))


SAMPLE_IDS = [(name, dtype, i) for name in OPS for dtype in DTYPES
              for i in range(len(_samples(name, DTYPES[dtype])))]


def test_torch_gives_the_counted_inputs():
    """The issue's counts: 84 OpInfo samples (42 per dtype, half of them unbatched), 10 error
    inputs; a torch upgrade that changes them shows here first."""
    assert len(SAMPLE_IDS) == 84
    assert sum(_samples(n, torch.float32)[i].input.dim() == 3 for n, d, i in SAMPLE_IDS if d == "float32") == 21
    assert len(list(OPINFOS["nn.functional.conv2d"].error_inputs("cpu"))) == 10


def _double(v):
    return v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v


@pytest.mark.parametrize("name,dtype,index", SAMPLE_IDS, ids=[f"{n.split('.')[-1]}-{d}-{i}" for n, d, i in SAMPLE_IDS])
def test_opinfo_sample(name, dtype, index):
    """Forward and gradients equal torch's float64 result; the channels-last form of a batched
    sample runs numbaconv's NHWC path and keeps the format."""
    ours_fn, torch_fn, _ = OPS[name]
    dt = DTYPES[dtype]
    s = _samples(name, dt, requires_grad=True)[index]
    args = [s.input, *s.args]
    ref_args = [_double(a) for a in args]
    y = ours_fn(*args, **s.kwargs)
    ref = torch_fn(*ref_args, **s.kwargs)
    assert y.dtype == dt and y.shape == ref.shape
    torch.testing.assert_close(y.double(), ref, **TOL[dt])
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(index))
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(y, tensors, g.to(dt))
    ref_grads = torch.autograd.grad(ref, [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad], g)
    for got, exp in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), exp, **TOL[dt])
    if s.input.dim() == 4:
        x_cl = s.input.detach().contiguous(memory_format=torch.channels_last)
        w_cl = s.args[0].detach().contiguous(memory_format=torch.channels_last)
        y_cl = ours_fn(x_cl, w_cl, *s.args[1:], **s.kwargs)
        if not x_cl.is_contiguous():  # (one channel or one pixel: both formats at once, NCHW runs)
            assert y_cl.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y_cl.double(), ref.detach(), **TOL[dt])


@pytest.mark.parametrize("name,dtype,index", SAMPLE_IDS, ids=[f"{n.split('.')[-1]}-{d}-{i}" for n, d, i in SAMPLE_IDS])
def test_opinfo_sample_through_numpy_nhwc(name, dtype, index):
    """The same sample through the NumPy API in NHWC / HWIO (converted), 3-D inputs included."""
    _, torch_fn, numpy_fn = OPS[name]
    dt = DTYPES[dtype]
    s = _samples(name, dt)[index]
    ref = torch_fn(*[_double(a) for a in (s.input, *s.args)], **s.kwargs).numpy()
    x, w = s.input.numpy(), s.args[0].numpy()
    bias = s.args[1].numpy() if len(s.args) > 1 and s.args[1] is not None else s.kwargs.get("bias")
    kwargs = {k: v for k, v in s.kwargs.items() if k != "bias"}
    x_nhwc = np.moveaxis(x, -3, -1)  # (N,) C, H, W -> (N,) H, W, C: a strided view
    y = numpy_fn(x_nhwc, numbaconv.convert_layout(w, "OIHW", "HWIO"), bias, layout="NHWC", weight_layout="HWIO",
                 **kwargs)
    np.testing.assert_allclose(np.moveaxis(y, -1, -3), ref, **TOL[dt])


ERROR_INPUTS = list(OPINFOS["nn.functional.conv2d"].error_inputs("cpu"))


@pytest.mark.parametrize("index", range(len(ERROR_INPUTS)), ids=[e.error_regex for e in ERROR_INPUTS])
def test_opinfo_error_input(index):
    s = ERROR_INPUTS[index].sample_input
    with pytest.raises((TypeError, ValueError)):
        nct.conv2d(s.input, *s.args, **s.kwargs)


MODULES = {torch.nn.Conv2d: nct.Conv2d, torch.nn.ConvTranspose2d: nct.ConvTranspose2d}
MODULE_CASES = [(info, training, i) for info in module_db if info.module_cls in MODULES
                for training in (True, False)
                for i in range(len(info.module_inputs_func(info, device="cpu", dtype=torch.float64,
                                                           requires_grad=True, training=training)))]


def test_module_db_gives_twelve_cases():
    assert len(MODULE_CASES) == 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("info,training,index", MODULE_CASES,
                         ids=[f"{c[0].module_cls.__name__}-{'train' if c[1] else 'eval'}-{c[2]}" for c in MODULE_CASES])
def test_module_info_input(info, training, index, dtype):
    """numbaconv's module built with the same constructor arguments and state: outputs, input
    and parameter gradients equal torch's module (run in float64)."""
    mi = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)[index]
    c, f = mi.constructor_input, mi.forward_input
    torch.manual_seed(index)
    ours = MODULES[info.module_cls](*c.args, **c.kwargs, dtype=dtype).train(training)
    ref = info.module_cls(*c.args, **c.kwargs, dtype=torch.float64).train(training)
    ref.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    x = f.args[0]
    x_ref = _double(x)
    y, y_ref = ours(x, *f.args[1:], **f.kwargs), ref(x_ref, *f.args[1:], **f.kwargs)
    assert type(y) is torch.Tensor and y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, **TOL[dtype])
    g = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, [x, *ours.parameters()], g.to(dtype))
    ref_grads = torch.autograd.grad(y_ref, [x_ref, *ref.parameters()], g)
    assert len(grads) == len(ref_grads) >= 2
    for got, exp in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), exp, **TOL[dtype])


# --- the operators --------------------------------------------------------------------------
def _t(*shape, cl=False, grad=True, seed=0):
    t = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if cl:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _opcheck_cases():
    for cl in (False, True):
        yield ops.conv2d, (_t(2, 4, 7, 6, cl=cl), _t(6, 2, 3, 3, cl=cl), _t(6), [2, 1], [1, 0, 2, 1], [1, 2], 2, "zeros")
        yield ops.conv2d, (_t(1, 3, 6, 6, cl=cl), _t(4, 3, 3, 3), None, [1, 1], [2, 2, 2, 2], [1, 1], 1, "reflect")
        yield ops.conv2d, (_t(2, 3, 5, 5, cl=cl, grad=False), _t(3, 1, 3, 3), _t(3), [1, 1], [1, 1, 1, 1], [1, 1], 3,
                           "circular")
        yield ops.conv2d_backward, (_t(2, 6, 4, 4, cl=cl, grad=False), _t(2, 4, 6, 6, cl=cl, grad=False),
                                    _t(6, 2, 3, 3, cl=cl, grad=False), [1, 1], [0, 0, 0, 0], [1, 1], 2, "zeros",
                                    [True, True, True])
        yield ops.conv2d_backward, (_t(1, 4, 3, 3, cl=cl, grad=False), _t(1, 3, 6, 6, cl=cl, grad=False),
                                    _t(4, 3, 2, 2, grad=False), [2, 2], [0, 1, 1, 0], [1, 1], 1, "replicate",
                                    [False, True, False])
        yield ops.conv_transpose2d, (_t(2, 4, 5, 5, cl=cl), _t(4, 3, 3, 3, cl=cl), _t(6), [3, 2], [1, 2], [2, 1], [2, 2],
                                     2)
        yield ops.conv_transpose2d, (_t(1, 2, 4, 3, cl=cl), _t(2, 3, 2, 2), None, [2, 2], [0, 0], [1, 1], [1, 1], 1)
        yield ops.conv2d_fused, (_t(2, 4, 6, 5, cl=cl, grad=False), _t(6, 2, 3, 3, grad=False), _t(6, grad=False),
                                 _t(2, 6, 6, 5, cl=cl, grad=False), [1, 1], [1, 1, 1, 1], [1, 1], 2, "zeros", "silu")
        yield ops.conv2d_fused, (_t(1, 3, 7, 7, cl=cl, grad=False), _t(3, 1, 3, 3, grad=False), None, None, [2, 2],
                                 [1, 1, 1, 1], [1, 1], 3, "reflect", "")


OPCHECK_CASES = list(_opcheck_cases())


@pytest.mark.parametrize("op,args", OPCHECK_CASES,
                         ids=[f"{op._name.split('::')[-1]}-{i}" for i, (op, _) in enumerate(OPCHECK_CASES)])
def test_opcheck(op, args):
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        nct.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        nct.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="reflect"), torch.nn.ReLU(),
        nct.Conv2d(8, 4, 3, padding="same", groups=4),
        nct.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1))


def _as_torch(net):
    """The same network on torch's own modules (same state)."""
    ref = copy.deepcopy(net)
    for m in ref.modules():
        if type(m) in (nct.Conv2d, nct.ConvTranspose2d):
            m.__class__ = m.__class__.__mro__[1]
    return ref


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_fullgraph_forward_and_backward(dynamic):
    import torch._dynamo

    net = _net()
    ref = _as_torch(net)
    x = torch.randn(2, 3, 10, 10, requires_grad=True)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(net, fullgraph=True, dynamic=dynamic)
    for shape, fmt in (((2, 3, 10, 10), torch.contiguous_format), ((1, 3, 12, 14), torch.channels_last)):
        x = torch.randn(*shape).contiguous(memory_format=fmt).requires_grad_(True)
        y = compiled(x)
        (gx,) = torch.autograd.grad(y.square().sum(), x)
        x_ref = x.detach().requires_grad_(True)
        y_ref = ref(x_ref)
        (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-4, atol=1e-4)
        if fmt is torch.channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)


def test_export_holds_the_operators_and_runs():
    net = _net().eval()
    ep = torch.export.export(net, (torch.randn(2, 3, 10, 10),))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("numbaconv.conv2d.default") == 3 and targets.count("numbaconv.conv_transpose2d.default") == 1
    x = torch.randn(2, 3, 10, 10)
    torch.testing.assert_close(ep.module()(x), _as_torch(net)(x), rtol=1e-5, atol=1e-5)


def test_tracing_records_the_operator_and_eager_equals_it():
    """Under a dispatch mode (make_fx here) the wrappers call the operator; eager calls run
    the same kernels without the dispatcher, with the same result."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, b = _t(1, 4, 6, 6, grad=False), _t(5, 4, 3, 3, grad=False), _t(5, grad=False)
    gm = make_fx(lambda x, w, b: nct.conv2d(x, w, b, padding=1))(x, w, b)
    assert any(str(n.target) == "numbaconv.conv2d.default" for n in gm.graph.nodes)
    eager = nct.conv2d(x, w, b, padding=1)
    assert torch.equal(eager, ops.conv2d(x, w, b, [1, 1], [1, 1, 1, 1], [1, 1], 1, "zeros"))
    assert torch.equal(eager, gm(x, w, b))


# --- ConvTranspose2d and convert ------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(stride=2, padding=1), dict(stride=(2, 3), padding=(0, 1), dilation=2, groups=2),
                                 dict(stride=3, padding=2, output_padding=1)], ids=["s2", "groups_dil", "outpad"])
def test_conv_transpose_module_output_size_and_formats(cfg):
    torch.manual_seed(0)
    ours = nct.ConvTranspose2d(4, 6, 3, dtype=torch.float64, **cfg)
    ref = torch.nn.ConvTranspose2d(4, 6, 3, dtype=torch.float64, **cfg)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    natural = ref(x).shape[2:]
    for size in (None, [natural[0] + 1, natural[1]], (2, 4, natural[0], natural[1] + 1)):
        if size is not None and (ours.stride[0] < 2 or ours.stride[1] < 2):
            continue
        torch.testing.assert_close(ours(x, output_size=size), ref(x, output_size=size), rtol=0, atol=1e-12)
    y = ours(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours(x[0]), ref(x[0]), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w, b: nct.conv_transpose2d(x, w, b, ours.stride, ours.padding,
                                                                         ours.output_padding, ours.groups,
                                                                         ours.dilation),
                                    (x[:1, :, :3, :3].clone().requires_grad_(True),
                                     ours.weight.detach().clone().requires_grad_(True),
                                     ours.bias.detach().clone().requires_grad_(True)))


def test_conv_transpose_falls_back_for_unsupported_dtype():
    m = nct.ConvTranspose2d(3, 2, 3, stride=2).to(torch.bfloat16)
    ref = torch.nn.ConvTranspose2d(3, 2, 3, stride=2).to(torch.bfloat16)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 3, 4, 4, dtype=torch.bfloat16)
    assert torch.equal(m(x), ref(x))


class _UNet(torch.nn.Module):
    """A two-level U-Net: the decoder's ConvTranspose2d and a skip concatenation."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.down = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = torch.nn.Conv2d(16, 2, 1)

    def forward(self, x):
        e = self.enc(x)
        return self.head(torch.cat([e, self.up(torch.relu(self.down(e)))], 1))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_convert_handles_conv_transpose(training):
    torch.manual_seed(0)
    model = _UNet().train(training)
    if not training:
        with torch.no_grad():  # non-trivial BatchNorm statistics to fold
            model(torch.randn(4, 3, 8, 8))
        model.eval()
    converted = nct.convert(model)
    assert any(type(m) is nct.ConvTranspose2d for m in converted.modules())
    assert not any(type(m) in (torch.nn.Conv2d, torch.nn.ConvTranspose2d) for m in converted.modules())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-5)
    if training:
        converted(x).sum().backward()
        model(x).sum().backward()
        for (name, a), b in zip(converted.named_parameters(), model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)


class _Block(torch.nn.Module):
    """ResNet's basic block and a MobileNet-style tail: BN folding, residual and activations;
    a max pool (convert's own module in eval mode)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.conv2, self.bn2 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.pw = torch.nn.Conv2d(8, 4, 1)
        self.pool = torch.nn.MaxPool2d(2, ceil_mode=True)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.pool(self.pw(torch.nn.functional.hardswish(self.dw(y))))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_converted_model_compiles_and_exports(channels_last):
    """convert's fused layers: one numbaconv::conv2d_fused each when compiled or exported,
    equal to the eager converted model (which runs plans)."""
    import torch._dynamo

    torch.manual_seed(0)
    model = _Block()
    with torch.no_grad():
        model(torch.randn(4, 8, 6, 6))
    model.eval()
    fast = nct.convert(model)
    assert sum(type(m) is nct.MaxPool2d for m in fast.modules()) == 1
    x = torch.randn(2, 8, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = fast(x)
        torch.testing.assert_close(eager, model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast(x), eager, rtol=0, atol=0)  # (its chain's program, made by the first call)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(fast)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch.testing.assert_close(torch.compile(fast, fullgraph=True)(x), eager, rtol=1e-5, atol=1e-6)
    ep = torch.export.export(fast, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("numbaconv.conv2d_fused.default") == 4
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), eager, rtol=1e-5, atol=1e-6)
