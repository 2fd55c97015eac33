"""``numbaconv.ahead``: a converted model's first forward records its layers (a meta-device
pass) exactly as its layers then run them; the background process compiles those layers
through the same plans; the two processes' claims keep them from compiling one function
twice; the hooks are gone after the first forward and the model still copies and pickles."""

import copy
import os
import pickle
import sys
import threading
import time

import pytest
import torch

import numbaconv.torch as nt
from numbaconv import ahead

_convert = sys.modules["numbaconv.torch.convert"]


class _Net(torch.nn.Module):
    """Conv + BN + ReLU6, a residual block (add then ReLU), a 1x1 without activation, a
    depthwise layer and a classifier (an op the meta pass must also get through)."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.b1 = torch.nn.BatchNorm2d(8)
        self.c2 = torch.nn.Conv2d(8, 8, 3, 1, 1)
        self.c3 = torch.nn.Conv2d(8, 16, 1)
        self.dw = torch.nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.fc = torch.nn.Linear(16, 4)

    def forward(self, x):
        x = torch.nn.functional.relu6(self.b1(self.c1(x)))
        x = torch.relu(self.c2(x) + x)
        x = self.dw(self.c3(x))
        return self.fc(x.mean((2, 3)))


def _seen_by_layers(model, x):
    """What each FusedConv2d gets in a real forward: (NCHW shape, layout, residual or not)."""
    seen = []

    def hook(module, args):
        x4 = args[0]
        seen.append((tuple(x4.shape), "NHWC" if nt.ops.is_channels_last(x4) else "NCHW", len(args) > 1
                     and args[1] is not None))
    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, _convert.FusedConv2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_record_lists_the_layers_as_they_run(fmt):
    model = nt.convert(_Net().eval()).to(memory_format=fmt)
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=fmt)
    recorded = _convert._record(model, (x,), {})
    assert [(r["x_shape"], r["layout"], r["residual"]) for r in recorded] == _seen_by_layers(model, x)
    assert [r["activation"] for r in recorded] == ["relu6", "relu", None, None]
    assert [r["w_shape"] for r in recorded] == [(8, 3, 3, 3), (8, 8, 3, 3), (16, 8, 1, 1), (16, 1, 3, 3)]
    assert recorded[3]["geometry"]["groups"] == 16 and recorded[0]["geometry"]["stride"] in (2, (2, 2))
    assert {r["dtype"] for r in recorded} == {"float32"}


def test_first_forward_removes_its_hooks_and_the_model_copies(monkeypatch):
    armed = []
    monkeypatch.setattr(ahead, "enabled", lambda: True)
    monkeypatch.setattr(ahead, "arm", armed.append)
    net = _Net().eval()
    model = nt.convert(net)
    pickle.loads(pickle.dumps(model))  # (hooks are module-level functions)
    x = torch.randn(1, 3, 10, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), rtol=1e-4, atol=1e-5)
        assert len(armed) == 1 and len(armed[0]()) == 4  # (the layers, found when asked)
        assert not model._forward_pre_hooks and not model._forward_hooks
        model(x)
    assert len(armed) == 1
    copy.deepcopy(model)
    pickle.loads(pickle.dumps(model))


def test_background_process_runs_the_layers(monkeypatch, tmp_path):
    """The process itself, on this process's cache (warm or not): every recorded layer runs
    through its plan and is logged; a pending arm starts nothing until something compiles."""
    log = tmp_path / "ahead.log"
    monkeypatch.setenv("NUMBACONV_AHEAD_LOG", str(log))
    monkeypatch.setattr(ahead, "enabled", lambda: True)
    model = nt.convert(_Net().eval())
    x = torch.randn(1, 3, 10, 10)
    ahead.arm(lambda: _convert._record(model, (x,), {}))
    assert ahead.stats()["armed"] and not ahead.stats()["running"]
    started = ahead.stats()["started"]
    ahead.on_cold_compile()
    assert ahead.stats()["started"] == started + 1
    claims = ahead._state["claims"]
    assert ahead.disarm(wait=True) == 0
    assert not os.path.exists(claims)  # (the claims directory goes with it)
    lines = [line for line in log.read_text().splitlines() if " s N" in line]
    order = ahead._order(_convert._record(model, (x,), {}))
    assert len(lines) == 4 and all(f"x{r['x_shape']} w{r['w_shape']}" in line for r, line in zip(order, lines))
    assert order[0]["w_shape"] == (8, 8, 3, 3)  # (the second kind of layer first: see _order)


def test_claims_keep_one_compile_per_function(monkeypatch, tmp_path):
    """The first to claim a function compiles it; the forward's process waits for a function
    the other is compiling; the background process puts its layer back instead (``_Busy``);
    a done claim lets either go on."""
    monkeypatch.setitem(ahead._state, "claims", str(tmp_path))
    monkeypatch.setitem(ahead._state, "done", set())

    def f():
        pass
    with ahead.claim(f, ("sig",)):  # first: this process compiles it, and marks it done
        pass
    assert (tmp_path / (ahead._claim_key(f, ("sig",)) + ".done")).exists()

    def g():
        pass
    held = tmp_path / ahead._claim_key(g, ("sig",))
    held.touch()  # (the other process is compiling g)

    class Alive:
        def poll(self):
            return None
    monkeypatch.setitem(ahead._state, "process", Alive())  # (as the forward's process)
    threading.Timer(0.3, lambda: open(str(held) + ".done", "w").close()).start()
    t0 = time.monotonic()
    with ahead.claim(g, ("sig",)):
        assert time.monotonic() - t0 >= 0.25
    ahead._state["done"].clear()
    os.unlink(str(held) + ".done")
    monkeypatch.setitem(ahead._state, "process", None)  # (as the background process)
    with pytest.raises(ahead._Busy):
        with ahead.claim(g, ("sig",)):
            pass
    open(str(held) + ".done", "w").close()
    with ahead.claim(g, ("sig",)):  # (done: loads from the cache)
        pass


def test_enabled_only_where_it_can_start_python(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3.11")
    monkeypatch.delenv("NUMBACONV_COMPILE_AHEAD", raising=False)
    assert ahead.enabled()
    monkeypatch.setenv("NUMBACONV_COMPILE_AHEAD", "0")
    assert not ahead.enabled()
    monkeypatch.delenv("NUMBACONV_COMPILE_AHEAD")
    monkeypatch.setattr(sys, "executable", "/usr/local/bin/uwsgi")  # (an embedded interpreter's host)
    assert not ahead.enabled()
    monkeypatch.setattr(sys, "executable", "/usr/bin/python3.11")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert not ahead.enabled()
