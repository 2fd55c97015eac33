"""Compile ahead in the background: a model's first forward on a cold cache uses both cores.

Numba compiles under one process-wide lock, so a converted model's first forward on a
fresh install compiles its kernels one after another on one core (~16 s for ResNet-18 or
MobileNetV2 on Zen 1) while the other core idles.  ``numbaconv.torch.convert``'s models
:func:`arm` a way to find their layers at their first forward.  If anything then really
compiles (a cache miss: the cache is cold; :func:`on_cold_compile`, from Numba's compile
events), the layers are found (one pass on torch's meta device: shapes only) and one
background process runs them on zeros, through the same plans, writing what it compiles to
the same on-disk cache, in :func:`_order`'s order; the forward pass, front to back, loads
from the cache what the background process compiled first (Numba looks there before
compiling), and the two meet in the middle.  :func:`disarm` at the end of the forward stops the process: whatever the
forward needed is compiled by then.  With a warm cache nothing starts.

Off with ``NUMBACONV_COMPILE_AHEAD=0``; see :func:`enabled`.  The process is a new
interpreter with this one's environment, cache directory, CPU target and Numba thread count
(plans choose kernels by it), and no torch.
"""

import contextlib
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time

__all__ = ["arm", "claim", "disarm", "enabled", "on_cold_compile", "stats"]

_state = {"pending": None, "process": None, "file": None, "started": 0, "listener": None,
          # where the two processes claim what each compiles (None: no background process)
          "claims": os.environ.get("NUMBACONV_AHEAD_DIR"), "done": set()}

#: longest wait for the other process's compile of one function (then compile it here)
_WAIT_S = 120.0


@contextlib.contextmanager
def claim(fn, sig):
    """Around the compile of ``fn`` for ``sig`` (a kernel task, or a launch entry) while a
    background process runs: the first of the two processes to claim it compiles it; the
    other waits until that is done and then loads it from the cache (both compiling the
    same function at the same time would waste the core one of them gave).  No background
    process: nothing."""
    root = _state["claims"]
    key = _claim_key(fn, sig)
    if root is None or key in _state["done"]:
        yield
        return
    path = os.path.join(root, key)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        mine = True
    except FileExistsError:
        mine = False
    except OSError:  # (the directory is gone: the background process is over)
        yield
        return
    if not mine and _state["process"] is None and not os.path.exists(path + ".done"):
        raise _Busy(key)  # (the background process: another layer meanwhile)
    if not mine:
        deadline = time.monotonic() + _WAIT_S
        while not os.path.exists(path + ".done") and time.monotonic() < deadline and _other_alive():
            time.sleep(0.01)
    try:
        yield
    finally:
        _state["done"].add(key)
        if mine:
            with contextlib.suppress(OSError):
                os.close(os.open(path + ".done", os.O_CREAT | os.O_WRONLY))


def _family(layer):
    """What decides the kernels a layer compiles, roughly: its algorithm (``auto``'s choice,
    no compile), layout, dtype, kernel size, stride, depthwise or grouped, epilogue."""
    import numpy as np

    from .auto import choose
    from .problem import ConvProblem
    dtype = np.dtype(layer["dtype"])
    n, c, h, w = layer["x_shape"]
    shape = (n, h, w, c) if layer["layout"] == "NHWC" else (n, c, h, w)
    x = np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape, (0,) * 4)  # (no memory)
    try:
        p = ConvProblem.from_args(x, np.zeros(layer["w_shape"], dtype), layout=layer["layout"], weight_layout="OIHW",
                                  **layer["geometry"])
        algorithm = choose(p, prepared=True)
        if algorithm == "tiled":  # (which of its kernels)
            from .cpu import tiled
            algorithm = f"tiled.{tiled.route(p, prepared=True)}"
        kind = (p.r, p.s, p.stride_h, p.stride_w, p.is_depthwise, p.groups > 1)
    except Exception:  # noqa: BLE001 -- the forward reports it
        algorithm, kind = None, layer["w_shape"][2:]
    return algorithm, layer["layout"], layer["dtype"], kind, layer["activation"], layer["residual"]


def _order(layers):
    """The background process's order: the forward meets the layers' kernel families
    (:func:`_family`) in the order they first appear and is busy with the first when the
    process starts, so the process takes the second (compiled while the forward compiles
    the first), then the others back to front, to meet the forward in the middle."""
    groups = {}
    for layer in layers:
        groups.setdefault(_family(layer), []).append(layer)
    groups = list(groups.values())
    return [layer for group in groups[1:2] + groups[2:][::-1] + groups[:1] for layer in group]


def _claim_key(fn, sig):
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', fn)}"
    return hashlib.sha1(f"{name}{sig}".encode()).hexdigest()[:20]


class _Busy(BaseException):
    """In the background process: the forward is compiling this function; its layer waits
    at the back of the queue.  (Not an ``Exception``: nothing in between catches it.)"""


def _install():
    """:func:`claim` around the kernels' compiles (:data:`numbaconv.cpu._launch.compile_guard`)."""
    from .cpu import _launch
    _launch.compile_guard[0] = claim


def _other_alive():
    proc = _state["process"]
    if proc is not None:  # (this is the forward's process)
        return proc.poll() is None
    parent = os.environ.get("NUMBACONV_AHEAD_PARENT")
    return parent is not None and os.getppid() == int(parent)


def enabled():
    """Whether background compiles may start: ``NUMBACONV_COMPILE_AHEAD`` is not ``0``, the
    process may use more than one core, and ``sys.executable`` is a Python interpreter."""
    if os.environ.get("NUMBACONV_COMPILE_AHEAD", "1") == "0":
        return False
    # (an embedded interpreter -- uWSGI, a GUI application -- has its host as sys.executable:
    # starting that again would start the host)
    if not os.path.basename(sys.executable or "").lower().startswith(("python", "pypy")):
        return False
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores > 1


def _listener():
    from numba.core import event

    class Listener(event.Listener):
        """Numba's compile events: the first start of a compile (after a cache miss) fires
        :func:`on_cold_compile`."""

        def on_start(self, ev):
            on_cold_compile()

        def on_end(self, ev):
            pass
    return Listener()


def arm(layers):
    """``layers()``: the layers (dicts for :func:`_run_layer`, in the order the model runs
    them) to compile in the background if anything compiles before :func:`disarm` (called
    then: finding them costs a pass over the model, for nothing when the cache is warm)."""
    if not enabled() or _state["process"] is not None:
        return
    from numba.core import event
    _state["pending"] = layers
    if _state["listener"] is None:
        _state["listener"] = _listener()
        event.register("numba:compile", _state["listener"])


def _unlisten():
    listener, _state["listener"] = _state["listener"], None
    if listener is not None:
        from numba.core import event
        event.unregister("numba:compile", listener)


def on_cold_compile():
    """Something is compiling (not loaded from the cache): start the armed layers' process."""
    find = _state["pending"]
    if find is None:
        return
    _state["pending"] = None
    path = claims = None
    try:
        seen, layers = set(), []
        for layer in find():  # (duplicates dropped)
            key = repr(sorted(layer.items()))
            if key not in seen:
                seen.add(key)
                layers.append(layer)
        if not layers:
            return
        import numba
        from numba.core import config
        fd, path = tempfile.mkstemp(prefix="numbaconv-ahead-", suffix=".pkl")
        with os.fdopen(fd, "wb") as f:
            # (and this process's thread count: plans choose their kernels by it)
            pickle.dump((_order(layers), numba.get_num_threads()), f)
        claims = tempfile.mkdtemp(prefix="numbaconv-ahead-claims-")
        env = dict(os.environ, NUMBACONV_COMPILE_AHEAD="0", NUMBACONV_AHEAD_DIR=claims,
                   NUMBACONV_AHEAD_PARENT=str(os.getpid()))
        if config.CACHE_DIR:
            env["NUMBA_CACHE_DIR"] = config.CACHE_DIR
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        _install()
        _state["process"] = subprocess.Popen([sys.executable, "-c", "import sys; from numbaconv.ahead import _main; "
                                              "_main(sys.argv[1], sys.argv[2] or None)", path,
                                              os.environ.get("NUMBACONV_AHEAD_LOG", "")], env=env,
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)
        _state["file"] = path
        _state["claims"] = claims
        _state["started"] += 1
    except Exception:  # noqa: BLE001 -- an optimisation: never let it break the forward
        _state["process"] = None
        if path is not None:  # (what was made before the failure)
            with contextlib.suppress(OSError):
                os.unlink(path)
        if claims is not None:
            shutil.rmtree(claims, ignore_errors=True)


def disarm(wait=False):
    """The forward is done: nothing more to start, and the process (if any) stopped (or, with
    ``wait``, waited for: tests).  Returns its exit code (None: none ran)."""
    _state["pending"] = None
    _unlisten()
    proc, _state["process"] = _state["process"], None
    code = None
    if proc is not None:
        if not wait:
            proc.kill()
        code = proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(_state["file"])
    if _state["claims"] is not None:
        shutil.rmtree(_state["claims"], ignore_errors=True)
        _state["claims"] = None
        _state["done"].clear()
    return code


def stats():
    """How many background processes this process started."""
    return {"started": _state["started"], "running": _state["process"] is not None,
            "armed": _state["pending"] is not None}


def _run_layer(layer):
    """One recorded layer through a :class:`numbaconv.Conv2dPlan`, on zeros: what the model's
    layer compiles (``layer``: ``x_shape`` (NCHW order), ``layout``, ``dtype``, ``w_shape``
    (OIHW), ``bias``, ``activation``, ``residual``, ``geometry``: the plan's keywords)."""
    import numpy as np

    import numbaconv
    dtype = np.dtype(layer["dtype"])
    w = np.zeros(layer["w_shape"], dtype)
    plan = numbaconv.Conv2dPlan(w, np.zeros(w.shape[0], dtype) if layer["bias"] else None, layout=layer["layout"],
                                weight_layout="OIHW", activation=layer["activation"], **layer["geometry"])
    n, c, h, wd = layer["x_shape"]
    x = np.zeros((n, h, wd, c) if layer["layout"] == "NHWC" else (n, c, h, wd), dtype)
    residual = np.zeros(plan.out_shape(x), dtype) if layer["residual"] else None
    plan(x, residual=residual)


def _main(path, log=None):
    """The background process: each layer of the file at ``path`` in turn; with ``log`` (a
    path: ``NUMBACONV_AHEAD_LOG``) one line per layer, its seconds and its shapes."""
    import numba
    _install()
    with open(path, "rb") as f:
        layers, threads = pickle.load(f)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    out = open(log, "a") if log else None
    if out:  # (and each function compiled)
        from numba.core import event

        class Log(event.Listener):
            def on_start(self, ev):
                pass

            def on_end(self, ev):
                f = ev.data["dispatcher"].py_func
                print(f"{time.time():.2f} compiled {f.__module__}.{f.__qualname__} {ev.data['args']}", file=out,
                      flush=True)
        event.register("numba:compile", Log())
    import collections
    queue = collections.deque(layers)
    busy = 0  # layers put back in a row: all of them waiting for the forward's compiles
    while queue and _other_alive():  # (the forward's process may be gone)
        layer = queue.popleft()
        t0 = time.perf_counter()
        try:
            _run_layer(layer)
            busy = 0
        except _Busy as busy_key:
            if out:
                print(f"{time.time():.2f} busy {busy_key} x{layer['x_shape']} w{layer['w_shape']}", file=out, flush=True)
            queue.append(layer)
            busy += 1
            if busy >= len(queue):
                time.sleep(0.05)
            continue
        except Exception:  # noqa: BLE001 -- the forward itself reports what is wrong with a layer
            pass
        if out:
            print(f"{time.time():.2f} {time.perf_counter() - t0:6.2f} s {layer['layout']} x{layer['x_shape']} "
                  f"w{layer['w_shape']} {layer['activation']} residual={layer['residual']}", file=out, flush=True)

