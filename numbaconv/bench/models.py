"""``numbaconv bench --models``: whole torchvision CNNs through :func:`numbaconv.torch.convert`
against torch eager and onnxruntime (the same model through ``torch.onnx.export``), in one
process, same thread count, outputs compared.

The models have random weights and random BatchNorm statistics (so folding is exercised):
the architectures are what users run.  torchvision's PyPI wheel registers fake kernels for
its compiled ops, which do not exist in the CPU build of torch; only its Python layers are
needed here, so :func:`import_torchvision` skips those registrations while importing it.
"""

import ctypes
import io
import time
import warnings

import numpy as np

__all__ = ["MODELS", "build", "import_torchvision", "measure", "format_rows", "steady_allocator"]

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0")


def import_torchvision():
    """``torchvision``, imported with its ``torchvision::`` fake-kernel registrations skipped."""
    import sys

    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    import torch.library

    real = torch.library.register_fake

    def register_fake(op, *args, **kwargs):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda fn=None, *a, **k: fn
        return real(op, *args, **kwargs)

    torch.library.register_fake = register_fake
    try:
        import torchvision
    finally:
        torch.library.register_fake = real
    return torchvision


def build(name, seed=0):
    """torchvision model ``name`` in eval mode, random weights and BatchNorm statistics."""
    import torch

    torchvision = import_torchvision()
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def steady_allocator():
    """Have glibc serve large blocks from its heap instead of a fresh ``mmap`` each (whose
    pages fault in, zeroed, on every call).  Batch-8 activations outgrow glibc's dynamic
    mmap threshold (32 MiB at most), so without this both torch and numbaconv spend up to
    half their time in page faults, by an amount that depends on what the process did
    before (an ``onnx.export`` happened to change it 2x).  The same as running with
    ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824``.  Returns
    whether it applied (glibc only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, 1 << 30))  # M_MMAP_ / M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def _onnxruntime_inference_session(model, x, threads, profile_prefix=None):
    """``model`` exported for inputs like ``x`` and loaded by onnxruntime (all graph
    optimisations, ``threads`` intra-op threads); ``profile_prefix``: profile every node into
    files starting with it (``scripts/chain_layers.py``)."""
    import onnxruntime as ort
    import torch

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=False, opset_version=17)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(f.getvalue(), so, providers=["CPUExecutionProvider"])


def _onnxruntime_session(model, x, threads):
    session = _onnxruntime_inference_session(model, x, threads)
    name = session.get_inputs()[0].name
    xa = x.contiguous().numpy()
    return lambda: session.run(None, {name: xa})[0]


def _best_ms(fn, seconds):
    fn()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times), 1e3 * float(np.median(times))


def _alternating_ms(first, second, seconds):
    """:func:`_best_ms` of two callables, run in alternation (the machine's drift hits both)."""
    first()
    second()
    a, b = [], []
    deadline = time.perf_counter() + 2 * seconds
    while len(a) < 3 or (time.perf_counter() < deadline and len(a) < 50):
        for fn, times in ((first, a), (second, b)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return tuple((1e3 * min(t), 1e3 * float(np.median(t))) for t in (a, b))


def measure(names=MODELS, batches=(1, 8), size=224, threads=2, seconds=2.0, onnxruntime=True, out=None):
    """One row per model x batch x memory format: ms (min, median) of torch eager, numbaconv
    and onnxruntime (NCHW rows), and the largest difference from torch's output.  Every
    peer runs under :func:`steady_allocator`; torch and numbaconv are timed in alternation."""
    import torch

    import numbaconv.torch as nt

    steady_allocator()
    torch.set_num_threads(threads)
    rows = []
    for name in names:
        model = build(name)
        converted = nt.convert(model)
        for batch in batches:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
            ort_run = _onnxruntime_session(model, x, threads) if onnxruntime else None
            for fmt, label in ((torch.contiguous_format, "NCHW"), (torch.channels_last, "channels_last")):
                xx = x.contiguous(memory_format=fmt)
                m, c = model.to(memory_format=fmt), converted.to(memory_format=fmt)
                with torch.no_grad():
                    ref, got = m(xx), c(xx)
                    torch_ms, numbaconv_ms = _alternating_ms(lambda: m(xx), lambda: c(xx), seconds)
                    row = dict(model=name, batch=batch, format=label, size=size, threads=threads,
                               max_rel_diff=float((got - ref).abs().max() / ref.abs().max()),
                               torch_ms=torch_ms, numbaconv_ms=numbaconv_ms)
                if ort_run is not None and label == "NCHW":
                    row["onnxruntime_ms"] = _best_ms(ort_run, seconds)
                    row["onnxruntime_max_rel_diff"] = float(np.abs(ort_run() - ref.numpy()).max()
                                                            / ref.abs().max())
                rows.append(row)
                if out is not None:
                    print(format_rows([row], header=len(rows) == 1), file=out, flush=True)
    return rows


def format_rows(rows, header=True):
    lines = []
    if header:
        lines.append(f"{'model':<20} {'batch':>5} {'format':<14} {'torch ms':>9} {'numbaconv':>9} {'x torch':>8} "
                     f"{'ort ms':>8} {'x ort':>6}  max rel diff")
    for r in rows:
        ort = r.get("onnxruntime_ms")
        lines.append(f"{r['model']:<20} {r['batch']:>5} {r['format']:<14} {r['torch_ms'][1]:>9.2f} "
                     f"{r['numbaconv_ms'][1]:>9.2f} {r['torch_ms'][1] / r['numbaconv_ms'][1]:>8.2f} "
                     + (f"{ort[1]:>8.2f} {ort[1] / r['numbaconv_ms'][1]:>6.2f}" if ort else f"{'':>8} {'':>6}")
                     + f"  {r['max_rel_diff']:.1e}")
    return "\n".join(lines)
