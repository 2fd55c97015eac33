"""Numba settings shared by every CPU kernel, and small helpers callable from ``@njit``.

* ``FASTMATH``: lets LLVM contract a*b+c into FMA, reassociate reductions (needed to
  vectorise them) and use reciprocals -- but never ``nnan``/``ninf``, which would let it
  assume finite values and break NaN/Inf propagation.
* ``cache=True`` everywhere: compiled kernels are written to ``NUMBA_CACHE_DIR`` (or
  ``__pycache__``) so a new process loads them instead of compiling again.
"""

import functools
import hashlib
import os
import pathlib
import types as pytypes

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba.core import cgutils
from numba.core import types
from numba.core.registry import CPUDispatcher
from numba.core.extending import intrinsic
from numba.np.arrayobj import _empty_nd_impl

from ._vec import _check_runs, run_copies, target_vector_bytes

FASTMATH = {"contract", "reassoc", "arcp"}


# --- the on-disk cache's freshness ------------------------------------------------------------
def package_stamp(root=None):
    """SHA-256 of every kernel source file of numbaconv (``cpu/``, ``grad/``, ``padding.py``)."""
    root = pathlib.Path(root or pathlib.Path(__file__).resolve().parents[1])
    h = hashlib.sha256()
    for f in sorted([*root.glob("cpu/*.py"), *root.glob("grad/*.py"), root / "padding.py"]):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.digest()


def _stamp_numba_cache():
    """Make Numba's cache entries of numbaconv's kernels depend on all kernel sources.

    Numba keys an entry on a hash of the one file the function is defined in, but a kernel
    compiles in the helpers it calls from other files (``_vec``'s register blocks, ``_jit``,
    ``tiled``'s copies inside ``winograd`` and ``grad``): changing only a helper would load
    machine code built from the old one.  Every cache locator class gets a twin, tried
    first and only for files of this package, whose source stamp also holds
    :func:`package_stamp`.  (Numba's locator list is internal: without it, nothing changes.)"""
    try:
        from numba.core import caching
        classes = caching.CacheImpl._locator_classes
    except (ImportError, AttributeError):
        return
    if any(getattr(c, "_numbaconv", False) for c in classes):
        return
    root = str(pathlib.Path(__file__).resolve().parents[1]) + os.sep
    stamp = package_stamp()

    def twin(base):
        class Locator(base):
            _numbaconv = True

            @classmethod
            def from_function(cls, py_func, py_file):
                if not os.path.abspath(py_file).startswith(root):
                    return None
                return super().from_function(py_func, py_file)

            def get_source_stamp(self):
                return (super().get_source_stamp(), stamp)
        Locator.__name__ = Locator.__qualname__ = f"Numbaconv{base.__name__}"
        return Locator
    classes[:0] = [twin(c) for c in list(classes)]


_stamp_numba_cache()

#: Numba options of a function for compiled callers only (micro-kernels, tasks run by address,
#: helpers): no CPython and C wrappers, which Numba otherwise lowers, optimises, emits and
#: caches for every function, again in each caller that links it (unboxing every argument: a
#: third to a half of a small kernel's machine code; a fresh install's first ``tiled`` layer
#: 7.3 -> 6.0 s on Zen 1).  Its entry for Python is a null address: see :class:`Compiled`.
NO_WRAPPERS = {"no_cpython_wrapper": True, "no_cfunc_wrapper": True}


def _with_wrappers(dispatcher):
    """A new dispatcher of the ``NO_WRAPPERS`` ``dispatcher``'s function and other options,
    with wrappers, named ``<qualname>.from_python`` so its cache entries never meet the
    original's."""
    f = dispatcher.py_func
    g = pytypes.FunctionType(f.__code__, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    g.__qualname__ = f"{f.__qualname__}.from_python"
    g.__module__, g.__doc__ = f.__module__, f.__doc__
    options = {k: v for k, v in dispatcher.targetoptions.items() if k not in ("nopython", *NO_WRAPPERS)}
    cached = type(dispatcher._cache).__name__ != "NullCache"  # (as ``dispatcher`` is)
    return numba.njit(cache=cached, **options)(g)


class Compiled(CPUDispatcher):
    """The dispatcher of a ``NO_WRAPPERS`` function: compiled code calls it as any other; a
    call from Python (tests, debugging) runs a twin compiled with wrappers, on first use."""

    def __call__(self, *args, **kwargs):
        from_python = self.__dict__.get("_from_python")
        if from_python is None:
            from_python = self._from_python = _with_wrappers(self)
        return from_python(*args, **kwargs)


def jit(fn=None, **options):
    """Serial kernel for compiled callers (``NO_WRAPPERS``; Python calls work, see
    :class:`Compiled`): called per tile from parallel tasks, or a task itself."""
    def decorate(f):
        d = numba.njit(**{"cache": True, "fastmath": FASTMATH, "nogil": True, **NO_WRAPPERS, **options})(f)
        d.__class__ = Compiled
        return d
    return decorate if fn is None else decorate(fn)
#: parallel kernel: owns a ``prange`` over independent work
pjit = functools.partial(numba.njit, cache=True, fastmath=FASTMATH, nogil=True, parallel=True)


def _run_pointer(context, builder, aryty, ary, start, n):
    """``(i8*, bytes)`` of ``ary[start:start + n]`` (flat, C-contiguous); under
    ``NUMBA_BOUNDSCHECK=1`` an ``IndexError`` unless ``0 <= start`` and ``start + n <= size``."""
    a = context.make_array(aryty)(context, builder, ary)
    i64 = ir.IntType(64)
    start = builder.sext(start, i64) if start.type.width < 64 else start
    n = builder.sext(n, i64) if n.type.width < 64 else n
    if numba.core.config.BOUNDSCHECK:
        _check_runs(context, builder, [(a, start)], n)
    item = context.get_abi_sizeof(context.get_data_type(aryty.dtype))
    ptr = builder.bitcast(builder.gep(a.data, [start]), ir.IntType(8).as_pointer())
    nbytes = builder.mul(builder.select(builder.icmp_signed(">", n, i64(0)), n, i64(0)), i64(item))
    return ptr, nbytes


def _flat_array(t):
    return isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C"


@intrinsic
def scratch(typingctx, n, like):
    """``np.empty(n, like.dtype)`` (a new C-contiguous 1-D array, uninitialised) allocated in
    the caller's own code: ``np.empty`` in a kernel compiles Numba's overload of it as a
    separate function (0.1 s of a fresh install's first call), this compiles nothing.  A
    negative or overflowing ``n`` raises as NumPy's does."""
    if not (isinstance(n, types.Integer) and isinstance(like, types.Array)):
        return None
    retty = types.Array(like.dtype, 1, "C")

    def codegen(context, builder, signature, args):
        size = context.cast(builder, args[0], signature.args[0], types.intp)
        return _empty_nd_impl(context, builder, retty, [size])._getvalue()
    return retty(n, like), codegen


@intrinsic
def move_run(typingctx, dst, d0, src, s0, n):
    """``dst[d0:d0 + n] = src[s0:s0 + n]`` on flat C-contiguous arrays of one dtype, as one
    ``llvm.memmove`` (nothing for ``n <= 0``), for long runs (whole rows): the element loop of
    :func:`copy_run` is compiled and vectorised again in each caller (tiled's padded copies
    spent most of their compile on their three fills and a copy), a library call is not.
    Short runs (a pixel's channels) stay with :func:`copy_run`: a call per run costs more."""
    if not (_flat_array(dst) and _flat_array(src) and dst.dtype == src.dtype):
        return None

    def codegen(context, builder, signature, args):
        dp, nbytes = _run_pointer(context, builder, signature.args[0], args[0], args[1], args[4])
        sp, _ = _run_pointer(context, builder, signature.args[2], args[2], args[3], args[4])
        cgutils.raw_memmove(builder, dp, sp, nbytes, 1)
        return context.get_dummy_value()
    return types.void(dst, d0, src, s0, n), codegen


@intrinsic
def zero_run(typingctx, dst, d0, n):
    """``dst[d0:d0 + n] = 0`` on a flat C-contiguous array, as one ``llvm.memset`` (nothing for
    ``n <= 0``; long runs: see :func:`move_run`)."""
    if not _flat_array(dst):
        return None

    def codegen(context, builder, signature, args):
        dp, nbytes = _run_pointer(context, builder, signature.args[0], args[0], args[1], args[2])
        cgutils.memset(builder, dp, nbytes, 0)
        return context.get_dummy_value()
    return types.void(dst, d0, n), codegen


#: ``copy_run(dst, d0, src, s0, n)``: ``dst[d0:d0 + n] = src[s0:s0 + n]``; ``fill_run(dst, d0, n,
#: value)``: ``dst[d0:d0 + n] = value`` -- on flat C-contiguous float arrays, in explicit vectors
#: of the target's width (:func:`numbaconv.cpu._vec.run_copies`): unlike a slice assignment
#: they compile no shape-mismatch message (seconds of string code in a serial function), and
#: unlike a loop LLVM has nothing to vectorise in each kernel that copies.  Long runs (whole
#: rows): :func:`move_run` (one memmove).
copy_run, fill_run = run_copies(target_vector_bytes())


@jit(inline="always")
def valid_range(offset, stride, size, out_size):
    """Output indices ``o`` in ``[lo, hi)`` for which ``0 <= o * stride + offset < size``.

    ``offset = tap * dilation - pad``.  Loops over ``[lo, hi)`` touch only real input, so
    zero padding costs no branch in the inner loop and never reads out of bounds.
    """
    lo = 0
    if offset < 0:
        # clipped to out_size: callers zero-fill [0, lo), which must stay inside the row
        lo = min(out_size, (-offset + stride - 1) // stride)
    hi = out_size
    last = size - 1 - offset  # largest o * stride allowed
    if last < 0:
        hi = 0
    else:
        hi = min(out_size, last // stride + 1)
    if hi < lo:
        hi = lo
    return lo, hi


# --- BLAS ?gemm ------------------------------------------------------------------------
# Numba's helper library exports ``numba_xxgemm`` (it forwards to SciPy's BLAS, the same
# path ``np.dot`` takes inside ``@njit``).  Naming the symbol -- instead of holding a ctypes
# pointer -- keeps the kernels cacheable.  Pointers travel as integer addresses (same
# calling convention on x86-64 and aarch64).  Column-major, with explicit leading
# dimensions, so strided sub-matrices of the output can be written or accumulated into.
# SciPy's BLAS module is imported by the helper on the first ?gemm call (as for a cached
# ``np.dot`` kernel), not here: importing it took 0.17 s of every ``import numbaconv``
# (SciPy's array-API layer loads numpy.f2py), though tiled and winograd never call BLAS.
_xxgemm = types.ExternalFunction(
    "numba_xxgemm",
    types.intc(types.char, types.char, types.char, types.intp, types.intp, types.intp,
               types.intp, types.intp, types.intp, types.intp, types.intp, types.intp,
               types.intp, types.intp),
)


def _openblas_local_threads_address():
    """Address of ``openblas_set_num_threads_local`` in the OpenBLAS that SciPy (and so
    numba's ``?gemm``) uses, or 0 where that library or symbol is not there."""
    import ctypes
    import glob
    import importlib.util

    spec = importlib.util.find_spec("scipy")  # (where it is installed; importing it costs 0.1 s)
    if spec is None or not spec.submodule_search_locations:
        return 0
    libs = os.path.join(os.path.dirname(list(spec.submodule_search_locations)[0]), "scipy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas*.so*"))):
        try:
            return ctypes.cast(ctypes.CDLL(path).openblas_set_num_threads_local, ctypes.c_void_p).value
        except (OSError, AttributeError):
            pass
    return 0


def _no_local_blas_threads(n):
    return 0


# Kernels call BLAS from inside their own prange with the callee restricted to the calling
# thread (``openblas_set_num_threads_local``: thread-local, no process-wide side effect).
# The symbol is registered under our own name, so cached kernels link to it by name.
_LOCAL_THREADS_ADDRESS = _openblas_local_threads_address()
if _LOCAL_THREADS_ADDRESS:
    llvm.add_symbol("numbaconv_blas_threads_local", _LOCAL_THREADS_ADDRESS)
    blas_threads_local = types.ExternalFunction("numbaconv_blas_threads_local", types.intc(types.intc))
else:  # pragma: no cover - other BLAS builds: BLAS keeps its own threading
    blas_threads_local = jit(_no_local_blas_threads)


@jit
def gemm(transa, transb, m, n, k, a, a_off, lda, b, b_off, ldb, beta, c, c_off, ldc):
    """Column-major ``C[m, n] = op(A)[m, k] @ op(B)[k, n] + beta * C`` on flat arrays.

    ``op(X)`` is ``X`` or ``X^T`` by ``transa`` / ``transb``; offsets and leading dimensions
    are in elements.  In row-major terms ``gemm(False, False, ...)`` computes
    ``C^T = B^T @ A^T``.  All arrays share one float dtype.
    """
    if m == 0 or n == 0:
        return
    scal = np.empty(2, dtype=c.dtype)
    scal[0] = 1.0
    scal[1] = beta
    itemsize = c.itemsize
    kind = np.int8(115) if itemsize == 4 else np.int8(100)  # 's' or 'd'
    ta = np.int8(116) if transa else np.int8(110)  # 't' or 'n'
    tb = np.int8(116) if transb else np.int8(110)
    _xxgemm(kind, ta, tb, m, n, k, scal.ctypes.data,
            a.ctypes.data + a_off * itemsize, lda, b.ctypes.data + b_off * itemsize, ldb,
            scal.ctypes.data + itemsize, c.ctypes.data + c_off * itemsize, ldc)
