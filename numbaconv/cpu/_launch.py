"""One parallel loop for every kernel: ``Task(task)(jobs, *args)``.

A ``prange`` driver costs 1-2 s of compile per function on a fresh install (Numba's parfor
passes, then the parallel body compiled again as a gufunc), and numbaconv had one per
kernel and copy, so a model's first forward paid it a dozen times.  Here the only
``prange`` is :func:`_run_parts`, whose arguments are four integers: it compiles once per
install (and per CPU) and is loaded from Numba's cache afterwards.

A kernel is a serial ``@jit`` function ``task(lo, hi, *args)`` over a range of independent
jobs (returning nothing; if it raises, as kernels do only under ``NUMBA_BOUNDSCHECK=1``, the
launch raises ``IndexError`` after it).
:class:`Task` gets its address from its own compile or cache entry and calls
:func:`launch_address`, a small entry (one per argument types) that stores ``args`` in its
stack frame and passes :func:`_run_parts` the address of a trampoline ``void(i64 lo, i64 hi,
i64 frame)``: the trampoline loads the arguments back (arrays without their memory owner,
as ``prange`` bodies see them: no reference counting in the task) and calls the task
through its address with Numba's calling convention.  So nothing links the task's code a
second time: an entry that links a kernel compiles, optimises and emits all of it again
(~0.5 s per kernel family).  The entry reaches :func:`_run_parts` by its address too
(:func:`run_parts_address`), so the parallel loop is not re-optimised in every entry.
``_run_parts`` splits ``[0, jobs)`` into one contiguous range per thread and runs them on
Numba's threading layer, as ``prange`` over the jobs did (same static split, same threads,
~5 us per launch; a pool of Python threads costs ~25).
"""

import contextlib

import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba.core import cgutils, types
from numba.core.extending import intrinsic
from numba.np.ufunc.parallel import _launch_threads

from ._jit import FASTMATH, NO_WRAPPERS, Compiled

_I64 = ir.IntType(64)
_TRAMPOLINE = ir.FunctionType(ir.VoidType(), [_I64, _I64, _I64])


@intrinsic
def _call(typingctx, fn, lo, hi, frame):
    """``fn(lo, hi, frame)``: ``fn`` the address of a trampoline."""
    sig = types.void(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        builder.call(builder.inttoptr(args[0], _TRAMPOLINE.as_pointer()), args[1:])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _num_threads(typingctx):
    """``numba.get_num_threads()`` through the threading layer's symbol, as Numba's own parfor
    launch calls it (the library function goes through a ctypes pointer, which would keep
    the caller out of the on-disk cache).  The threading layer is started here at compile
    time and, from the cache, by the reload hook :func:`_keep_threads_started` records."""
    _launch_threads()

    def codegen(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I64, []), "get_num_threads")
        return builder.call(fn, [])
    return types.int64(), codegen


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH, **NO_WRAPPERS)
def _run_parts(fn, frame, jobs, parts):
    for i in prange(parts):
        lo = np.int64(jobs) * i // parts
        hi = np.int64(jobs) * (i + 1) // parts
        if hi > lo:
            _call(fn, lo, hi, frame)


_run_parts.__class__ = Compiled  # (wrapperless: a call from Python runs a wrapped twin)

_RUN_PARTS_SIG = (types.int64,) * 4
_run_parts_address = [0]


def run_parts_address():
    """Address of :func:`_run_parts` (compiled or loaded from the cache once per process).
    Entries call it through this address, like tasks: an entry that called it directly
    linked its parallel loop (the parfor and its gufunc) and optimised and emitted all of it
    again, once per entry (argument types): 0.2-0.3 s of each on a fresh install, Zen 1."""
    if not _run_parts_address[0]:
        _launch_threads()
        _run_parts_address[0] = task_address(_run_parts, _RUN_PARTS_SIG, lo_hi=False)
    return _run_parts_address[0]


def call_by_address(context, builder, address, restype, argtys, vals):
    """Emit a call of the function at ``address`` (an i64), compiled by Numba for ``argtys``
    returning ``restype``, with ``vals`` (already of ``argtys``), by Numba's calling
    convention: ``(status, result)`` -- ``status`` as :func:`succeeded` reads it, ``result``
    the returned value (None for ``types.none``).  Every by-address call here and in
    ``epilogue`` goes through it."""
    fnty = context.call_conv.get_function_type(restype, argtys)
    ret = cgutils.alloca_once(builder, fnty.args[0].pointee)
    builder.store(cgutils.get_null_value(fnty.args[0].pointee), ret)
    exc = cgutils.alloca_once(builder, fnty.args[1].pointee)
    packed = list(context.call_conv._get_arg_packer(argtys).as_arguments(builder, vals))
    code = builder.call(builder.inttoptr(address, fnty.as_pointer()), [ret, exc] + packed)
    result = None if restype == types.none else context.get_returned_value(builder, restype, builder.load(ret))
    return code, result


def succeeded(builder, code):
    """Numba's status codes: 0 (returned a value) or -2 (returned None) is success."""
    return builder.or_(builder.icmp_signed("==", code, code.type(0)), builder.icmp_signed("==", code, code.type(-2)))


@intrinsic
def _call_run_parts(typingctx, address, fn, frame, jobs, parts):
    """``_run_parts(fn, frame, jobs, parts)`` through its address (Numba's calling convention;
    it raises nothing)."""
    sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        call_by_address(context, builder, args[0], types.none, _RUN_PARTS_SIG, list(args[1:]))
        return context.get_dummy_value()
    return sig, codegen


def _borrowed(context, builder, ty, value):
    """``value`` (of Numba type ``ty``) with every array's memory owner set to null, as
    ``prange`` bodies see arrays: a task's views then take no reference count, an atomic add
    on a cache line every thread shares (2 threads ran view-heavy kernels up to 2x slower).
    The entry keeps the arrays alive until the launch returns."""
    if isinstance(ty, types.Array):
        ary = context.make_array(ty)(context, builder, value=value)
        ary.meminfo = cgutils.get_null_value(ary.meminfo.type)
        return ary._getvalue()
    if isinstance(ty, types.BaseTuple):
        for i, t in enumerate(ty.types):
            value = builder.insert_value(value, _borrowed(context, builder, t, builder.extract_value(value, i)), i)
    return value


def _keep_threads_started(context):
    """A function that launches needs Numba's threading layer started before it is loaded
    (its code calls the layer's symbols).  Numba records that as a reload hook on parallel
    functions and their callers, but drops it from libraries loaded from the cache: an entry
    compiled in a process where ``launch`` came from the cache would not carry it, and a
    process loading only that entry would call into an unstarted layer.  So each entry that
    binds a launch records the hook itself."""
    from numba.core.typed_passes import _reload_parfors
    library = getattr(context, "active_code_library", None)
    if library is not None and hasattr(library, "_reload_init"):
        library._reload_init.add(_reload_parfors)


# --- by address: the entry does not link the task ------------------------------------------
#: around each compile of a task or launch entry: ``compile_guard[0](function, signature)``, a
#: context manager (``numbaconv.ahead`` sets its claims here: two processes compiling side by
#: side then never compile one function twice)
compile_guard = [lambda fn, sig: contextlib.nullcontext()]


def task_address(task, argtypes, lo_hi=True):
    """Address of ``task`` compiled (or loaded from the cache) for ``(int64, int64, *argtypes)``
    (``lo_hi=False``: for ``argtypes`` alone)."""
    sig = (types.int64, types.int64, *argtypes) if lo_hi else tuple(argtypes)
    return _address(task, sig, types.none, "a task returns nothing")


def _address(fn, sig, restype, expected):
    """Address of ``fn`` compiled (or loaded from the cache) for ``sig``, which must return
    ``restype`` (else ``TypeError``: ``expected``, and what it returns)."""
    cres = fn.overloads.get(sig)
    if cres is None:
        with compile_guard[0](fn, sig):  # (a background process may be compiling it: numbaconv.ahead)
            fn.compile(sig)
        cres = fn.overloads[sig]
    if cres.signature.return_type != restype:
        raise TypeError(f"{expected}, {fn.__name__} returns {cres.signature.return_type}")
    return cres.library.get_pointer_to_function(cres.fndesc.llvm_func_name)


_I32 = ir.IntType(32)


@intrinsic
def _bind_address(typingctx, address, args):
    """``(trampoline, frame, failed)`` for the task at ``address`` (see :func:`task_address`)
    with ``args``: the trampoline calls it through the pointer, with Numba's calling
    convention for those argument types, and sets the int32 at ``failed`` when the task
    raised (kernels raise only under ``NUMBA_BOUNDSCHECK=1``: an out-of-bounds index)."""
    if not isinstance(args, types.BaseTuple):
        return None
    argtys = (types.int64, types.int64, *args.types)
    sig = types.UniTuple(types.int64, 3)(types.int64, args)

    def codegen(context, builder, signature, llargs):
        _keep_threads_started(context)
        frame = cgutils.alloca_once_value(builder, cgutils.make_anonymous_struct(builder, [*llargs, _I32(0)]))
        tramp = cgutils.get_or_insert_function(builder.module, _TRAMPOLINE, "numbaconv_by_address")
        if tramp.is_declaration:  # (one per entry: the entry is specialised on ``args``)
            tramp.linkage = "internal"
            b = ir.IRBuilder(tramp.append_basic_block())
            lo, hi, addr = tramp.args
            fp = b.inttoptr(addr, frame.type)
            st = b.load(fp)
            tup = _borrowed(context, b, args, b.extract_value(st, 1))
            vals = [lo, hi] + [b.extract_value(tup, i) for i in range(len(args))]
            code, _ = call_by_address(context, b, b.extract_value(st, 0), types.none, argtys, vals)
            with b.if_then(b.not_(succeeded(b, code)), likely=False):
                b.store(_I32(1), b.gep(fp, [_I32(0), _I32(2)]))
            b.ret_void()
        failed = builder.gep(frame, [_I32(0), _I32(2)])
        return cgutils.pack_array(builder, [builder.ptrtoint(tramp, _I64), builder.ptrtoint(frame, _I64),
                                            builder.ptrtoint(failed, _I64)])
    return sig, codegen


@intrinsic
def _load_flag(typingctx, address):
    """The int32 at ``address``."""
    def codegen(context, builder, signature, args):
        return builder.sext(builder.load(builder.inttoptr(args[0], _I32.as_pointer())), _I64)
    return types.int64(types.int64), codegen


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, no_cfunc_wrapper=True)  # (Python calls it)
def launch_address(address, run_parts, jobs, *args):
    """The task at ``address`` over ``[0, jobs)`` with ``args``, one contiguous range per
    thread (``numba.get_num_threads()``), in parallel through :func:`_run_parts` at address
    ``run_parts``; serially for one.  A task that raised (only under
    ``NUMBA_BOUNDSCHECK=1``) makes it raise ``IndexError`` once every part is done (the
    task's own exception cannot cross the trampoline)."""
    fn, frame, failed = _bind_address(address, args)
    parts = min(_num_threads(), jobs)
    if parts <= 1:
        _call(fn, 0, jobs, frame)
    else:
        _call_run_parts(run_parts, fn, frame, jobs, parts)
    if _load_flag(failed) != 0:
        raise IndexError("a numbaconv kernel task raised (an index out of bounds under NUMBA_BOUNDSCHECK=1)")


def type_key(a):
    """What decides Numba's type of ``a`` (cheaper than ``numba.typeof``)."""
    if isinstance(a, np.ndarray):  # (flags.num: contiguity, alignment, writeability, ...)
        return a.dtype.num, a.ndim, a.flags.num
    if isinstance(a, tuple):
        return tuple(map(type_key, a))
    return type(a)


class Task:
    """A serial task ``task(lo, hi, *args)`` run in parallel from Python by its address
    (:func:`launch_address`).  ``task(jobs, *args)`` keys the address on the arguments'
    types (a few microseconds); ``task.run(key, jobs, *args)`` takes the caller's key, for
    callers that know which arguments can change type (most are fixed per layer)."""

    def __init__(self, task):
        self.task = task
        self._by_key = {}

    def run(self, key, jobs, *args):
        address = self._by_key.get(key)
        if address is None:
            _launch_threads()  # (what the reload hook does; cheap once started)
            argtypes = tuple(numba.typeof(a) for a in args)
            address = task_address(self.task, argtypes)
            with compile_guard[0](launch_address, argtypes):  # (its entry compiles, or loads, here)
                launch_address(address, run_parts_address(), jobs, *args)
            self._by_key[key] = address
            return
        launch_address(address, run_parts_address(), jobs, *args)

    def __call__(self, jobs, *args):
        self.run(tuple(map(type_key, args)), jobs, *args)


# --- callees by address: a kernel that calls a large helper without linking it ------------------
def _normalised(t):
    """The type a callee is compiled for when a kernel passes a value of type ``t``: integers
    as int64, literals as their plain type, the rest as it is."""
    t = types.unliteral(t)
    return types.int64 if isinstance(t, types.Integer) else t


def _signature_tag(argtys, restype):
    """A 62-bit fingerprint of a callee's signature: a kernel checks the address it is given
    was compiled for the types it passes."""
    import hashlib
    return int(hashlib.sha1(repr((tuple(argtys), restype)).encode()).hexdigest()[:15], 16)


def callee(fn, argtypes, restype=types.none):
    """``(address, tag)`` of ``fn`` compiled (or loaded from the cache) for ``argtypes`` (as
    :func:`call_at` passes them: see :func:`_normalised`), returning ``restype``: two entries
    of the int64 array a kernel calls it through."""
    argtypes = tuple(_normalised(t) for t in argtypes)
    return _address(fn, argtypes, restype, f"a callee returns {restype}"), _signature_tag(argtypes, restype)


@intrinsic
def call_at(typingctx, fns, slot, like, args):
    """``fn(*args)`` for the function at ``fns[slot]`` (:func:`callee`; its tag at ``fns[slot +
    1]``), returning a value of ``like``'s type (``None``: nothing).  Numba's calling
    convention, through the address: the kernel compiles and emits none of the callee's code
    (a kernel that calls a large helper directly links it and optimises and emits all of it
    again: ~1 s of a depthwise or Winograd kernel's compile on Zen 1).  A tag that does not
    match the types passed here raises ``RuntimeError`` (never a call with the wrong types);
    a callee that raised (bounds checks only) makes this raise ``IndexError``."""
    if not (isinstance(fns, types.Array) and isinstance(fns.dtype, types.Integer) and isinstance(args, types.BaseTuple)):
        return None
    argtys = tuple(_normalised(t) for t in args.types)
    restype = types.none if isinstance(like, (types.NoneType, types.Omitted)) else types.unliteral(like)
    tag = _signature_tag(argtys, restype)
    sig = restype(fns, slot, like, args)

    def codegen(context, builder, signature, llargs):
        fnsty = signature.args[0]
        ary = context.make_array(fnsty)(context, builder, llargs[0])
        i = context.cast(builder, llargs[1], signature.args[1], types.int64)
        address = builder.load(builder.gep(ary.data, [i]))
        given = builder.load(builder.gep(ary.data, [builder.add(i, i.type(1))]))
        with builder.if_then(builder.icmp_signed("!=", given, given.type(tag)), likely=False):
            context.call_conv.return_user_exc(builder, RuntimeError,
                                              ("numbaconv: a kernel's callee was compiled for other types",))
        vals = [context.cast(builder, builder.extract_value(llargs[3], k), args.types[k], argtys[k])
                for k in range(len(argtys))]
        code, result = call_by_address(context, builder, address, restype, argtys, vals)
        if numba.core.config.BOUNDSCHECK:
            with builder.if_then(builder.not_(succeeded(builder, code)), likely=False):
                context.call_conv.return_user_exc(builder, IndexError, ("a numbaconv kernel's callee raised",))
        return context.get_dummy_value() if result is None else result
    return sig, codegen
