"""``numbaconv.torch.convert``: eval-mode models with BatchNorm folded and activations /
residual additions fused equal the original within float32 rounding, in both memory
formats; train-mode models swap modules and keep their gradients; the given model is left
unchanged.  The five torchvision architectures of the model benchmark run at 64x64."""

import copy

import pytest
import torch

import numbaconv.torch as nt
from numbaconv.bench import models

torch.manual_seed(0)


class Block(torch.nn.Module):
    """ResNet's basic block, written with every form convert fuses: modules, functions, ``+=``."""

    def __init__(self, c_in, c_out, stride, act):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.act = act
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            torch.nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return torch.nn.functional.relu(out)


def _small_net():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(inplace=True),
        Block(16, 16, 1, torch.nn.SiLU()), Block(16, 32, 2, torch.nn.Hardswish()),
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 8, 1, padding_mode="reflect"),  # no BN, no activation
        torch.nn.Conv2d(8, 8, 3, padding=2, padding_mode="reflect"),
    )
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.running_mean, -0.5, 0.5)
            torch.nn.init.uniform_(m.running_var, 0.5, 2.0)
            torch.nn.init.uniform_(m.weight, 0.5, 1.5)
            torch.nn.init.uniform_(m.bias, -0.2, 0.2)
    return net


def _assert_close(got, want, rel=2e-5):
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() < rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_model_folds_fuses_and_matches(dtype):
    net = _small_net().to(dtype).eval()
    before = copy.deepcopy(net.state_dict())
    converted = nt.convert(net)
    assert isinstance(converted, torch.fx.GraphModule)
    kinds = [type(m) for m in converted.modules()]
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.Conv2d not in kinds
    fused = [m for m in converted.modules() if isinstance(m, nt.FusedConv2d)]
    assert len(fused) == 9
    assert sum(m.folded_batchnorm for m in fused) == 7
    assert {m.activation for m in fused} == {"relu6", "silu", "hardswish", "relu", None}
    targets = {n.op: n for n in converted.graph.nodes}
    assert not any(n.op == "call_function" and "add" in str(n.target) for n in converted.graph.nodes), targets
    for k, v in net.state_dict().items():  # inplace=False: the given model is unchanged
        assert torch.equal(v, before[k])
    assert all(type(m) is not nt.Conv2d for m in net.modules())
    x = torch.randn(2, 3, 17, 18, dtype=dtype)
    rel = 2e-5 if dtype == torch.float32 else 1e-12
    with torch.no_grad():
        want = net(x)
        _assert_close(converted(x), want, rel)
        xc = x.contiguous(memory_format=torch.channels_last)
        got = converted.to(memory_format=torch.channels_last)(xc)
        assert got.is_contiguous(memory_format=torch.channels_last)
        _assert_close(got, want, rel)
        _assert_close(converted(x[0]), want[0], rel)  # unbatched


def test_train_mode_swaps_modules_and_gradients_flow():
    net = _small_net().double().train()  # float64: conv biases before a BatchNorm get ~0 gradients
    converted = nt.convert(net)
    assert sum(type(m) is nt.Conv2d for m in converted.modules()) == 9
    assert not any(type(m) is nt.Conv2d for m in net.modules())
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    converted(x).square().sum().backward()
    net(x).square().sum().backward()
    for (name, p), q in zip(net.named_parameters(), converted.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12), name


def test_inplace_and_untraceable_models():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                return self.conv(x)
            return -self.conv(x)

    model = Branchy().eval()
    out = nt.convert(model, inplace=True)
    assert out is model and type(model.conv) is nt.Conv2d
    x = torch.randn(1, 3, 8, 8).abs()
    with torch.no_grad():
        _assert_close(model(x), torch.nn.functional.conv2d(x, model.conv.weight, model.conv.bias))


def test_broadcasting_residual_falls_back_to_torch():
    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.register_buffer("shift", torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return torch.relu(self.conv(x) + self.shift)

    model = Bias().eval()
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        _assert_close(nt.convert(model)(x), model(x))


@pytest.mark.parametrize("name", models.MODELS)
def test_torchvision_models(name):
    model = models.build(name)
    converted = nt.convert(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in converted.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
        _assert_close(converted(x), want, 1e-4)
        xc = x.contiguous(memory_format=torch.channels_last)
        _assert_close(converted.to(memory_format=torch.channels_last)(xc), want, 1e-4)


def test_model_benchmark_rows():
    """``numbaconv bench --models``'s measurement on a small image: every peer timed, outputs compared."""
    rows = models.measure(["resnet18"], batches=(1,), size=32, seconds=0.01)
    assert [(r["model"], r["format"]) for r in rows] == [("resnet18", "NCHW"), ("resnet18", "channels_last")]
    assert all(r["max_rel_diff"] < 1e-4 for r in rows)
    assert rows[0]["onnxruntime_max_rel_diff"] < 1e-4 and "onnxruntime_ms" not in rows[1]
    assert "resnet18" in models.format_rows(rows)


def test_fused_layers_follow_changes_to_their_buffers():
    """A FusedConv2d's plan holds prepared copies of its weights: an in-place change of a buffer
    (its version counter), a replaced buffer (assignment, ``load_state_dict`` into it, a dtype
    change) must reach the next call, in both memory formats."""
    torch.manual_seed(1)
    fused = nt.FusedConv2d(torch.nn.Conv2d(4, 6, 3, padding=1), None, "relu").eval()
    x = torch.randn(2, 4, 7, 7)

    def want(mod, inp):
        y = torch.nn.functional.conv2d(inp.double(), mod.weight.double(), mod.bias.double(), padding=1)
        return torch.relu(y)

    with torch.no_grad():
        for fmt in (torch.contiguous_format, torch.channels_last):
            xc = x.contiguous(memory_format=fmt)
            fused(xc)
            fused.weight.mul_(-2.0)  # in place
            _assert_close(fused(xc).double(), want(fused, xc))
            fused.bias.add_(1.0)
            _assert_close(fused(xc).double(), want(fused, xc))
            fused.weight = torch.randn_like(fused.weight)  # a new tensor
            _assert_close(fused(xc).double(), want(fused, xc))
            state = {k: torch.randn_like(v) for k, v in fused.state_dict().items()}
            fused.load_state_dict(state)
            _assert_close(fused(xc).double(), want(fused, xc))
        fused64 = fused.double()
        _assert_close(fused64(x.double()), want(fused64, x.double()), 1e-12)


def test_repeated_calls_follow_their_inputs():
    """A FusedConv2d's second call like its first skips the checks to the plan's launch: calls
    that differ from the last one (shape, memory format, residual or not, its strides, an input
    that requires grad, a 3-D input) must each get their own correct result, in any order;
    a used layer deep-copies and pickles."""
    import pickle

    torch.manual_seed(2)
    fused = nt.FusedConv2d(torch.nn.Conv2d(4, 6, 3, padding=1), None, "silu").eval()

    def want(inp, res=None):
        y = torch.nn.functional.conv2d(inp.double(), fused.weight.double(), fused.bias.double(), padding=1)
        return torch.nn.functional.silu(y if res is None else y + res.double())

    x1, x2 = torch.randn(2, 4, 7, 7), torch.randn(1, 4, 5, 9)
    r1 = torch.randn(2, 6, 7, 7)
    cl = torch.channels_last
    calls = [(x1, None), (x1, None), (x1, r1), (x1, r1), (x2, None), (x1, None),
             (x1.contiguous(memory_format=cl), None), (x1.contiguous(memory_format=cl), r1.contiguous(memory_format=cl)),
             (x1.contiguous(memory_format=cl), r1), (x1, r1.contiguous(memory_format=cl)),
             (x1, r1[:, :, :, :]), (x1, r1.transpose(2, 3).contiguous().transpose(2, 3)),
             (x1.clone().requires_grad_(), None), (x1[0], None), (x1, None), (x1, r1)]
    with torch.no_grad():
        for i, (x, r) in enumerate(calls):
            got = fused(x) if r is None else fused(x, r)
            _assert_close(got.double(), want(x, r))
            assert got.is_contiguous(memory_format=cl if x.dim() == 4 and x.is_contiguous(memory_format=cl)
                                     and not x.is_contiguous() else torch.contiguous_format), i
        for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
            _assert_close(copied(x1, r1).double(), want(x1, r1))


def _chains(model):
    return [m for m in model.modules() if isinstance(m, nt.ConvChain)]


def test_conv_chains_run_their_program_and_follow_changes(monkeypatch):
    """Consecutive fused layers become ConvChains: after a first call through the layers, a call
    with inputs like it runs the chain's program (no layer called as a module), reusing its
    buffers -- earlier results stay intact -- and any change falls back to the layers: another
    batch or memory format, an input that needs grad, a weight changed in place or replaced, a
    hook on a layer or a global one.  Each call equals torch (float64)."""
    import pickle

    torch.manual_seed(3)
    whole = _small_net().double().eval()
    net = whole[:-2].eval()  # (without the reflect-padded layers: those run conv2d's path, no launch)
    converted = nt.convert(net)
    chains = _chains(converted)
    assert [len(c.layers) for c in chains] == [7] and chains[0].outputs == (6,)
    calls = []
    forward = nt.FusedConv2d.forward
    monkeypatch.setattr(nt.FusedConv2d, "forward", lambda self, *a: calls.append(self) or forward(self, *a))

    def check(x, through_layers):
        calls.clear()
        with torch.no_grad():
            got, want = converted(x), net(x)
        _assert_close(got, want, 1e-12)
        assert bool(calls) == through_layers
        return got, want

    x1, x2 = torch.randn(2, 3, 9, 10, dtype=torch.float64), torch.randn(1, 3, 7, 7, dtype=torch.float64)
    check(x1, True)
    y1, want1 = check(x1, False)
    y1b, _ = check(x1 + 1, False)
    _assert_close(y1, want1, 1e-12)  # not overwritten by the next call's program
    check(x2, True)
    check(x2, False)
    check(x1, False)  # (a program per input signature)
    xc = x1.contiguous(memory_format=torch.channels_last)
    check(xc, True)
    check(xc, False)
    with torch.no_grad():
        _assert_close(converted(x1.clone().requires_grad_()), net(x1), 1e-12)
    fused = chains[0].layers[0]
    fused.weight.mul_(0.5)  # in place: the version changes, the plan is remade
    net_w = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)][0].weight
    with torch.no_grad():
        net_w.mul_(0.5)
    check(x1, True)
    check(x1, False)
    seen = []
    handle = chains[-1].layers[-1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    check(x1, True)
    check(x1, True)
    assert len(seen) == 2
    handle.remove()
    check(x1, False)
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        check(x1, True)
    finally:
        handle.remove()
    for copied in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        with torch.no_grad():
            _assert_close(copied(x1), net(x1), 1e-12)
            _assert_close(copied(x1), net(x1), 1e-12)
    # a chain with a layer that has no launch (reflect padding) runs its layers, every call
    # (after the first: a cold cache's first forward also runs them on torch's meta device,
    # for numbaconv.ahead)
    converted = nt.convert(whole)
    with torch.no_grad():
        converted(x1)
    for _ in range(3):
        calls.clear()
        with torch.no_grad():
            _assert_close(converted(x1), whole(x1), 1e-12)
        assert len(calls) == 9


def test_conv_chain_program_from_threads():
    """Two threads calling one converted model at once: one runs the program, the other the
    layers (the program's buffers are not shared); every result correct."""
    import concurrent.futures

    torch.manual_seed(4)
    net = _small_net().eval()
    converted = nt.convert(net)
    xs = [torch.randn(2, 3, 12, 12) for _ in range(16)]
    with torch.no_grad():
        want = [net(x) for x in xs]
        converted(xs[0])

        def run(i):
            with torch.no_grad():
                return converted(xs[i])
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got = list(pool.map(run, range(len(xs))))
    for g, w in zip(got, want):
        _assert_close(g, w)


def test_conv_chain_with_several_outputs():
    """A chain whose inner results are also used after it (here by torch ops between and after
    its layers) returns each of them; the program equals the layers, call after call."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.c, self.d = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 4, 3, stride=2)

        def forward(self, x):
            a = torch.relu(self.a(x))
            b = self.b(a) + a
            c = self.c(b)
            return self.d(c) , torch.tanh(a).mean() + b.sum()

    torch.manual_seed(5)
    net = Net().double().eval()
    converted = nt.convert(net)
    chains = _chains(converted)
    assert [c.outputs for c in chains] == [(0, 1, 3)], [c.outputs for c in chains]
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            (y, s), (wy, ws) = converted(x + i), net(x + i)
            _assert_close(y, wy, 1e-12)
            _assert_close(s, ws, 1e-12)


def test_eval_identities_are_dropped_so_residuals_fuse():
    """Dropout (module and F.dropout traced in eval), Identity and torchvision's stochastic
    depth (EfficientNet's residual branch) pass their input through in eval mode: convert
    removes them, so the residual add after them fuses into the convolution; same result."""
    tv = models.import_torchvision()
    stochastic_depth = tv.ops.stochastic_depth

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.c = torch.nn.Conv2d(8, 8, 1)
            self.drop, self.ident = torch.nn.Dropout2d(0.3), torch.nn.Identity()

        def forward(self, x):
            a = torch.relu(self.a(x))
            b = stochastic_depth(self.b(a), 0.2, "row", self.training) + a
            c = self.ident(self.drop(self.c(b)))
            return torch.nn.functional.dropout(c, 0.5, self.training) + b

    torch.manual_seed(6)
    net = Net().double().eval()
    converted = nt.convert(net)
    calls = [n for n in converted.graph.nodes if n.op in ("call_function", "call_module")]
    assert all(n.op == "call_module" and isinstance(converted.get_submodule(n.target), nt.ConvChain)
               for n in calls), converted.code
    fused = [m for m in converted.modules() if isinstance(m, nt.FusedConv2d)]
    assert len(fused) == 3
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):
            _assert_close(converted(x), net(x), 1e-12)
    assert nt.convert(net.train()).training  # (train mode: the plain module swap, dropout kept)


def test_conv_chain_program_without_buffers_over_its_budget(monkeypatch):
    """A program whose buffers would exceed ConvChain.MAX_BUFFER_BYTES keeps none (fresh arrays
    per call) and still runs the launches, not the layers; results equal torch."""
    torch.manual_seed(7)
    net = _small_net()[:-2].double().eval()
    converted = nt.convert(net)
    (chain,) = _chains(converted)
    chain.MAX_BUFFER_BYTES = 0
    x = torch.randn(2, 3, 10, 9, dtype=torch.float64)
    calls = []
    forward = nt.FusedConv2d.forward
    monkeypatch.setattr(nt.FusedConv2d, "forward", lambda self, *a: calls.append(self) or forward(self, *a))
    with torch.no_grad():
        converted(x)
        calls.clear()
        for i in range(3):
            _assert_close(converted(x + i), net(x + i), 1e-12)
    assert not calls
    (program,) = chain._programs.values()
    assert program.kept_bytes == 0
    del chain.MAX_BUFFER_BYTES  # (the class's budget again: the next program keeps its buffers)
    chain._programs.clear()
    with torch.no_grad():
        converted(x)
        _assert_close(converted(x), net(x), 1e-12)
    (program,) = chain._programs.values()
    assert 0 < program.kept_bytes <= nt.ConvChain.MAX_BUFFER_BYTES
