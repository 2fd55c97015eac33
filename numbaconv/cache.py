"""Numba's on-disk cache of numbaconv's kernels, and ``numbaconv.warmup``: compile ahead into
it (Docker builds, CI, dask workers).

Kernels compile on first use and are cached on disk (``NUMBA_CACHE_DIR``, else
``__pycache__`` beside the package).  A fresh container, CI runner or worker starts with an
empty cache; ``warmup`` runs each requested layer once, in worker processes (one per dtype
and layout, so independent kernel families compile side by side), and reports what was
compiled and how long it took.  With a warm cache nothing compiles: it is a no-op but for
loading.

What to warm:

* ``layers``: layer geometries, each ``(N, C, H, W, K, R, S[, stride[, padding[, groups]]])``
  (square stride / padding) or a dict of :func:`numbaconv.conv2d` keywords with ``x_shape``
  (NCHW) and ``w_shape`` (OIHW);
* ``model``: a named architecture -- ``"resnet18"``, ``"resnet50"``, ``"mobilenet_v2"`` (their
  conv layers at 224 x 224, batch 1; built in, no torchvision needed) -- or ``"all"``: a
  small set of layers that reaches every kernel family of this CPU (dense, 1x1, strided,
  deep NCHW, depthwise stride 1 and 2, few-channel streaming, 7x7 stem) with every host
  algorithm.
"""

import concurrent.futures
import multiprocessing
import os
import time

__all__ = ["warmup", "model_layers", "cache_dir", "MODELS"]


def _layer(n, c, h, w, k, r, s, stride=1, padding=0, groups=1):
    return dict(x_shape=(n, c, h, w), w_shape=(k, c // groups, r, s), stride=stride, padding=padding,
                groups=groups)


def _resnet(blocks, bottleneck):
    layers = [_layer(1, 3, 224, 224, 64, 7, 7, 2, 3)]
    size, cin = 56, 64
    for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
        cout = width * 4 if bottleneck else width
        for b in range(count):
            stride = 2 if stage > 0 and b == 0 else 1
            out = size // stride
            if bottleneck:
                layers += [_layer(1, cin, size, size, width, 1, 1),
                           _layer(1, width, size, size, width, 3, 3, stride, 1),
                           _layer(1, width, out, out, cout, 1, 1)]
            else:
                layers += [_layer(1, cin, size, size, cout, 3, 3, stride, 1),
                           _layer(1, cout, out, out, cout, 3, 3, 1, 1)]
            if b == 0 and (stride != 1 or cin != cout):
                layers.append(_layer(1, cin, size, size, cout, 1, 1, stride))
            cin, size = cout, out
    return layers


def _mobilenet_v2():
    layers = [_layer(1, 3, 224, 224, 32, 3, 3, 2, 1)]
    size, cin = 112, 32
    for t, c, n, s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1)):
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = cin * t
            if t != 1:
                layers.append(_layer(1, cin, size, size, hidden, 1, 1))
            layers.append(_layer(1, hidden, size, size, hidden, 3, 3, stride, 1, hidden))
            size //= stride
            layers.append(_layer(1, hidden, size, size, c, 1, 1))
            cin = c
    layers.append(_layer(1, 320, 7, 7, 1280, 1, 1))
    return layers


def _every_family():
    """Small layers that reach every kernel family and remainder path of this CPU."""
    return [_layer(1, 16, 12, 12, 40, 3, 3, 1, 1),       # dense 3x3 (tiled micro-kernels)
            _layer(1, 16, 12, 12, 40, 1, 1),             # 1x1 (a GEMM)
            _layer(1, 16, 12, 12, 40, 1, 1, 2),          # strided 1x1
            _layer(1, 24, 14, 14, 24, 3, 3, 2, 1),       # strided 3x3
            _layer(1, 512, 7, 7, 512, 3, 3, 1, 1),       # deep NCHW (dot)
            _layer(1, 32, 16, 16, 32, 3, 3, 1, 1, 32),   # depthwise stride 1
            _layer(1, 32, 16, 16, 32, 3, 3, 2, 1, 32),   # depthwise stride 2
            _layer(1, 3, 32, 32, 3, 3, 3),               # few channels (streaming)
            _layer(1, 3, 32, 32, 16, 7, 7, 2, 3),        # 7x7 stem
            _layer(1, 16, 10, 10, 16, 3, 3, 1, 1, 4)]    # grouped


#: named architectures: their conv layers (224 x 224, batch 1), no torchvision needed
MODELS = {"resnet18": lambda: _resnet((2, 2, 2, 2), False), "resnet50": lambda: _resnet((3, 4, 6, 3), True),
          "mobilenet_v2": _mobilenet_v2, "all": _every_family}


def model_layers(name):
    """The conv layers of a named architecture (see :data:`MODELS`), without duplicates."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    seen, out = set(), []
    for layer in MODELS[name]():
        key = repr(sorted(layer.items()))
        if key not in seen:
            seen.add(key)
            out.append(layer)
    return out


def _as_layer(spec):
    if isinstance(spec, dict):
        if not {"x_shape", "w_shape"} <= set(spec):
            raise ValueError(f"a layer dict needs 'x_shape' (NCHW) and 'w_shape' (OIHW), got {spec!r}")
        return dict(spec)
    if isinstance(spec, str):
        spec = [int(v) for v in spec.replace("x", ",").split(",") if v.strip()]
    if not (isinstance(spec, (tuple, list)) and 7 <= len(spec) <= 10 and all(isinstance(v, int) for v in spec)):
        raise ValueError("a layer must be (N, C, H, W, K, R, S[, stride[, padding[, groups]]]) or a dict, "
                         f"got {spec!r}")
    return _layer(*spec)


def _work(layers, dtype, layout, algorithms, epilogue=False):
    """In a worker process: run every layer once per algorithm (and once more with an
    activation: the kernels' epilogue variants); what compiled, how long."""
    import numpy as np
    from numba.core.event import install_recorder

    import numbaconv
    def arrays(layer):
        """Zero input (in ``layout``) and OIHW weights of ``layer``, and its other keywords."""
        x = np.zeros(layer["x_shape"], dtype)
        if layout == "NHWC":
            x = numbaconv.convert_layout(x, "NCHW", "NHWC")
        return x, np.zeros(layer["w_shape"], dtype), {k: v for k, v in layer.items() if k not in ("x_shape", "w_shape")}

    rows = []

    def timed(layer, algorithm, run):
        """``run()`` once: a row of what it compiled and how long it took."""
        t0 = time.perf_counter()
        with install_recorder("numba:compile") as rec:
            run()
        rows.append(dict(layer=layer, dtype=np.dtype(dtype).name, layout=layout, algorithm=algorithm,
                         compiled=sum(1 for _, ev in rec.buffer if ev.is_end), seconds=time.perf_counter() - t0))

    for layer in layers:
        x, w, kw = arrays(layer)
        for algorithm in algorithms:
            def run(algorithm=algorithm):
                numbaconv.conv2d(x, w, layout=layout, weight_layout="OIHW", algorithm=algorithm, **kw)
                if epilogue:  # one variant of each kernel serves every activation, with or without a residual
                    numbaconv.conv2d(x, w, layout=layout, weight_layout="OIHW", algorithm=algorithm,
                                     activation="relu", **kw)
            timed(layer, algorithm, run)
    if epilogue and layers:
        # a fused epilogue's runs compile once per activation and residual or not (whatever
        # the kernel), and a plan without an activation hands kernels a no-op one: each once
        from numbaconv.cpu import epilogue as epi
        from numbaconv.cpu import pool

        def runs():
            for code in sorted(set(epi.CODES.values())):
                for has_res in (False, True):
                    epi._runs_address(dtype, code, has_res)
        timed(layers[0], "epilogues", runs)
        # and the max pooling convert gives models (one kernel per dtype and layout)
        timed(layers[0], "max_pool2d", lambda: pool.max_pool2d(np.zeros((1, 4, 4, 4), dtype), (3, 3), (2, 2), (1, 1),
                                                               (1, 1), False, layout))
    return rows


def warmup(layers=None, *, model=None, dtypes=("float32",), layouts=("NCHW", "NHWC"), algorithms=("auto",),
           epilogue=False, processes=None, verbose=True, stream=None):
    """Compile the kernels that ``layers`` / ``model`` need into Numba's on-disk cache.

    Runs each layer once (zeros, batch as given) per dtype x layout x algorithm, in up to
    ``processes`` worker processes (default: one per dtype x layout, at most the CPU count).
    ``model="all"`` also runs every host algorithm.  ``epilogue=True`` also compiles the
    kernels' fused-epilogue variants (what ``activation=`` / ``residual=``, ``Conv2dPlan`` with
    an activation and ``numbaconv.torch.convert``'s layers run) and the max pooling of
    converted models.  Returns one dict per run: ``layer,
    dtype, layout, algorithm, compiled`` (functions compiled: 0 when the cache was warm),
    ``seconds``; prints a summary when ``verbose``.
    """
    import numpy as np

    from .registry import REGISTRY, algorithms as usable_algorithms
    todo = [_as_layer(s) for s in (layers or [])]
    if model is not None:
        todo += model_layers(model)
        if model == "all":
            algorithms = tuple(algorithms) + tuple(a for a in usable_algorithms() if REGISTRY[a].host
                                                   and a not in algorithms)
    if not todo:
        raise ValueError("warmup needs layers or a model")
    dtypes = [np.dtype(d) for d in dtypes]
    for d in dtypes:
        if d not in (np.float32, np.float64):
            raise ValueError(f"dtypes must be float32 / float64, got {d!r}")
    for layout in layouts:
        if layout not in ("NCHW", "NHWC"):
            raise ValueError(f"layouts must be 'NCHW' / 'NHWC', got {layout!r}")
    jobs = [(todo, d.name, layout, tuple(algorithms), epilogue) for d in dtypes for layout in layouts]
    workers = max(1, min(processes or len(jobs), len(jobs), os.cpu_count() or 1))
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter per worker, as a new user gets
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        rows = [row for part in pool.map(_work, *zip(*jobs)) for row in part]
    wall = time.perf_counter() - t0
    if verbose:
        import sys
        out = stream or sys.stdout
        compiled = [r for r in rows if r["compiled"]]
        for r in compiled:
            g = r["layer"]
            print(f"  compiled {r['compiled']:3d} functions in {r['seconds']:6.2f} s: {r['dtype']} {r['layout']} "
                  f"{r['algorithm']} x{tuple(g['x_shape'])} w{tuple(g['w_shape'])} stride={g['stride']} "
                  f"padding={g['padding']} groups={g['groups']}", file=out)
        total = sum(r["compiled"] for r in rows)
        print(f"numbaconv warmup: {len(rows)} runs ({len(todo)} layers x {len(dtypes)} dtypes x {len(layouts)} layouts"
              f" x {len(algorithms)} algorithms), {total} functions compiled "
              f"({'the cache was warm: nothing to do' if not total else 'now cached'}), {wall:.1f} s "
              f"in {workers} processes; cache: {cache_dir()}", file=out)
    return rows


def cache_dir():
    """Where Numba writes numbaconv's compiled kernels."""
    from numba.core import config
    if config.CACHE_DIR:
        return config.CACHE_DIR
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "**", "__pycache__")
