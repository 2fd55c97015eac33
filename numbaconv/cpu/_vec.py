"""Explicit-vector register blocks: LLVM vector IR emitted from ``@intrinsic``.

Numba has no vector type.  The first micro-kernels held ``P x V`` scalar accumulators and
left LLVM's SLP vectoriser to pack them into registers; that took ~9 s to compile per
kernel, and on Intel server cores (whose LLVM models carry ``prefer-256-bit``) SLP packed
them into ymm halves instead of zmm, doubling the FMAs and spilling.  Here the register
plan is written down as vectors: ``<W x float>`` weight loads, one broadcast per input
value, ``llvm.fmuladd`` on ``<W x float>`` accumulators.  Explicit vector types are legal at
their full width whatever the vectorisers prefer, so the plan compiles to the same
registers on every x86-64 family (``W`` is chosen from the width of the target Numba
compiles for: :func:`target_vector_bytes`), and LLVM has nothing to search: a block
compiles in well under a second.

The accumulators live in ``alloca`` slots of the function's entry block; LLVM's ``mem2reg``
turns them into phi values carried around the reduction loop (registers, no memory).
The blocks: :func:`conv_block` (tiled's micro-kernel), :func:`dot_block` (dot's deep-NCHW
block), :func:`dw3x3_block` (the NHWC depthwise block), :func:`tap_sweep` (the NCHW depthwise plane
sweeps), :func:`tile_transform` (Winograd's tile
transforms), :func:`transpose8` (NCHW -> NHWC
copies), :func:`fma_chains` (the FMA peak probe).  ``tests/test_codegen.py`` reads what they
compile to on each x86-64 family.
"""

import contextlib
import functools
import itertools

from llvmlite import binding as ll
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import intrinsic

__all__ = ["lanes", "unroll", "conv_block", "prefetchw", "dot_block", "dw3x3_block", "tap_sweep", "strided_runs",
           "channel_taps", "copy2d", "run_copies", "scatter_block", "tile_transform", "transpose8", "fma_chains", "target_vector_bytes", "target_description"]


def _target_machine():
    from numba.core.registry import cpu_target
    return cpu_target.target_context.codegen()._tm


def target_description():
    """``(triple, cpu name, features)`` Numba compiles for (its cache is keyed on them)."""
    from numba.core.registry import cpu_target
    return cpu_target.target_context.codegen().magic_tuple()


@functools.lru_cache(maxsize=None)
def target_vector_bytes():
    """Width in bytes of the widest *legal* float vector register of the target Numba compiles
    for (64: AVX-512, 32: AVX/AVX2, 16: SSE / other): read from the assembly LLVM emits for a
    ``<16 x float>`` add, so ``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES`` are honoured, not the
    host's CPUID."""
    mod = ir.Module(name="probe")
    vty = ir.VectorType(ir.FloatType(), 16)
    fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [vty.as_pointer()] * 2), name="probe")
    b = ir.IRBuilder(fn.append_basic_block())
    a, c = fn.args
    b.store(b.fadd(b.load(a), b.load(c)), a)
    b.ret_void()
    parsed = ll.parse_assembly(str(mod))
    parsed.triple = ll.get_process_triple()
    asm = _target_machine().emit_assembly(parsed)
    if "zmm" in asm:
        return 64
    if "ymm" in asm:
        return 32
    return 16


def _fmuladd(builder, a, b, c):
    """``a * b + c``, fused where the target has FMA (``llvm.fmuladd``: on an SSE-only
    target ``llvm.fma`` would become a libm call per lane)."""
    vty = a.type
    scalar = getattr(vty, "element", vty)
    bits = 64 if isinstance(scalar, ir.DoubleType) else 32
    name = f"llvm.fmuladd.v{vty.count}f{bits}" if isinstance(vty, ir.VectorType) else f"llvm.fmuladd.f{bits}"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), name)
    return builder.call(fn, [a, b, c])


_loop_ids = itertools.count()


@contextlib.contextmanager
def _loop(builder, count, vectorize=True):
    """``for i in range(count)`` (``i64``), not unrolled by LLVM: the register plan is the
    unroll (an unrolled copy would keep two steps' broadcasts live and spill).
    ``vectorize=False``: nor vectorised (a scalar remainder or gather: LLVM's search for a
    vector form would cost compile time for a few iterations)."""
    i64 = ir.IntType(64)
    pre = builder.basic_block
    cond, body, end = (builder.append_basic_block(f"vloop.{name}") for name in ("cond", "body", "end"))
    builder.branch(cond)
    with builder.goto_block(cond):
        index = builder.phi(i64)
        index.add_incoming(i64(0), pre)
        builder.cbranch(builder.icmp_signed("<", index, count), body, end)
    builder.position_at_end(body)
    yield index
    index.add_incoming(builder.add(index, i64(1)), builder.basic_block)
    back = builder.branch(cond)
    module = builder.module
    off = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
    tag = module.add_metadata([ir.MetaDataString(module, f"numbaconv.vloop.{next(_loop_ids)}")])
    hints = [tag, off]
    if not vectorize:
        hints.append(module.add_metadata([ir.MetaDataString(module, "llvm.loop.vectorize.enable"),
                                          ir.IntType(1)(0)]))
    loop_id = module.add_metadata(hints)
    loop_id.operands = (loop_id,) + tuple(loop_id.operands)  # loop ids refer to themselves
    back.set_metadata("llvm.loop", loop_id)
    builder.position_at_end(end)


def _vector_ptr(builder, base, index, vty):
    return builder.bitcast(builder.gep(base, [index]), vty.as_pointer())


def lanes(vector_bytes, itemsize):
    """Lanes per accumulator of the register blocks: a register of the target's width, at
    least 4 (two of them make ``tiled``'s ``V``: 8-32 output channels)."""
    return max(4, min(16, vector_bytes // itemsize))


#: reduction steps per iteration of :func:`conv_block`'s innermost loop (then a remainder
#: loop): each step's 1 + P address computations and the loop's counter are shared by four
#: steps' loads (displacements), so the 2P FMAs issue without integer work between them. On
#: Intel Xeon (AVX-512, 8 x 2 zmm) the block ran 143-160 -> 160-175 GFLOP/s on one core
#: (peak 214), the 3x3 layers 8-15 % faster; the AVX2 blocks keep every register (no spill)
UNROLL = 4
#: ... while the block holds at most this many accumulators: 28 (AVX-512's 14 x 2) unrolled
#: four times spilled (LLVM's scheduler hoisted later steps' broadcasts into registers the
#: accumulators needed), one step per iteration keeps all 32 zmm (28 + 2 weights + a broadcast)
UNROLL_MAX_ACCUMULATORS = 16


def unroll(accumulators):
    """Reduction steps per iteration of a register block with ``accumulators`` registers."""
    return UNROLL if accumulators <= UNROLL_MAX_ACCUMULATORS else 1
#: how far ahead of the reduction step :func:`conv_block` prefetches its vector operand (the
#: weights' stream): a model's deep layers find their weights in memory, not in cache, and the
#: hardware prefetchers ramp up on each block's short stream again (Intel Xeon, 12 weight sets
#: in turn, batch 1: Winograd res5 1.46 -> 1.22 ms, res4 0.99 -> 0.86 ms; with hot weights no change)
PREFETCH_BYTES = 1024


def _prefetch(builder, ptr, write=False):
    """Prefetch the line of ``ptr`` into L1 (``llvm.prefetch``, read or write intent): a hint,
    never a fault, even past an array's end."""
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(ptr, i8p), i32(int(write)), i32(3), i32(1)])


@intrinsic
def prefetchw(typingctx, arr, idx):
    """``prefetchw`` the cache line of ``arr[idx]`` (write intent; see :func:`_prefetch`).  The
    micro-kernels issue it for their output block before the reduction, so the write-allocate
    misses of the stores (measured ~470 cycles per 1x1 block with a cold output) overlap the
    FMAs."""
    if not isinstance(arr, types.Array):
        return None
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        _prefetch(builder, builder.gep(ary.data, [args[1]]), write=True)
        return context.get_dummy_value()

    return sig, codegen


@functools.lru_cache(maxsize=None)
def conv_block(p_, nv, w_=None, vector_bytes=None, row_bias=False, m=1, prefetch=True):
    """An intrinsic ``block(xf, wf, tmp, xb, wb, r_, s_, xs_r, xs_s, xs_p, ws_c, ws_t, cin,
    of, ob, os_p, bias, kb0, mode)`` computing, for ``p < p_`` output pixels and
    ``j < nv*w_`` output channels::

        acc[p, j] = sum over r < r_, s < s_, c < cin of
            xf[xb + r*xs_r + s*xs_s + c + p*xs_p] * wf[wb + (r*s_ + s)*ws_t + c*ws_c + j]

    in ``p_ x nv`` accumulators of ``w_`` lanes: per reduction step ``nv`` vector loads,
    ``p_`` broadcasts, ``p_*nv`` FMAs.  Then, by ``mode``: 0 -- ``tmp[p*nv*w_ + j] = acc``;
    1 -- ``of[ob + p*os_p + j] = acc + bias[kb0 + j]``; 2 -- ``of[ob + p*os_p + j] += acc``
    (1 and 2: a whole block of channels-last output, stored as vectors).  Index arguments
    are element offsets (any integer type).  FMA is fused (one rounding), as with
    ``fastmath`` contraction; no other reordering of the sum over ``c``.  ``w_=None``: the
    lanes follow the dtype, :func:`lanes` of ``vector_bytes`` (one block for both dtypes).
    ``row_bias``: mode 1 adds ``bias[kb0 + p]`` to every lane of row ``p`` instead (the
    blocks of :mod:`numbaconv.cpu.pointwise`, whose rows are output channels).

    ``prefetch``: each step prefetches its vector rows :data:`PREFETCH_BYTES` ahead (streams of
    weights); off where consecutive steps read the same lines (a plane's taps one element
    apart: the prefetches took as many load slots as the loads).

    ``m > 1`` (one register, ``nv == 1``): ``m`` groups of ``w_/m`` output channels share the
    register (grouped convolutions with few channels per group).  Step ``c`` reads the
    ``m``-tuple ``xf[xb + ... + c*m + p*xs_p + i]`` (channel ``c`` of each group, interleaved
    in the input) and broadcasts it as a whole (``vbroadcastsd`` / ``vbroadcastf32x4``: a load,
    no shuffle), so lane ``j`` of the weights and accumulators is output channel ``j // m`` of
    group ``j % m``; the stores put the lanes back in channel order (group-major), one lane
    permutation per pixel.  ``cin`` counts tuple elements (``m`` per step).
    """
    @intrinsic
    def block(typingctx, xf, wf, tmp, xb, wb, r_, s_, xs_r, xs_s, xs_p, ws_c, ws_t, cin, of, ob, os_p, bias, kb0,
              mode):
        arrays = (xf, wf, tmp, of, bias)
        if not all(isinstance(a, types.Array) for a in arrays):
            return None
        if len({a.dtype for a in arrays}) != 1 or not isinstance(xf.dtype, types.Float):
            return None
        sig = types.void(xf, wf, tmp, xb, wb, r_, s_, xs_r, xs_s, xs_p, ws_c, ws_t, cin, of, ob, os_p, bias, kb0,
                         mode)
        wl = w_ or lanes(vector_bytes, xf.dtype.bitwidth // 8)
        if m > 1 and (nv != 1 or wl % m or row_bias):
            return None

        def codegen(context, builder, signature, args):
            argtys = signature.args
            xa, wa, ta = (context.make_array(t)(context, builder, v) for t, v in zip(argtys[:3], args[:3]))
            oa, ba = (context.make_array(argtys[i])(context, builder, args[i]) for i in (13, 16))
            i64 = ir.IntType(64)
            ints = [context.cast(builder, args[i], argtys[i], types.int64) for i in (*range(3, 13), 14, 15, 17, 18)]
            xb_, wb_, rr, ss, xsr, xss, xsp, wsc, wst, cn, ob_, osp, kb0_, mode_ = ints
            fty = context.get_value_type(xf.dtype)
            vty = ir.VectorType(fty, wl)
            align = xf.dtype.bitwidth // 8
            zero = ir.Constant(vty, [ir.Constant(fty, 0.0)] * wl)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in range(p_)]
            undef = ir.Constant(vty, ir.Undefined)
            i32 = ir.IntType(32)
            splat = ir.Constant(ir.VectorType(i32, wl), [i32(0)] * wl)
            tuple_ty = ir.VectorType(fty, m)
            tile = ir.Constant(ir.VectorType(i32, wl), [i32(j % m) for j in range(wl)])  # (the tuple, repeated)
            kg = wl // m  # lane k*m + i holds channel i*kg + k: back to channel order on the way out
            unmix = ir.Constant(ir.VectorType(i32, wl), [i32((n % kg) * m + n // kg) for n in range(wl)])

            def result(p, v):
                acc = builder.load(accs[p][v])
                return acc if m == 1 else builder.shuffle_vector(acc, undef, unmix)
            xofs = [builder.mul(xsp, i64(p)) for p in range(p_)]
            with cgutils.for_range(builder, rr) as lr:
                with cgutils.for_range(builder, ss) as ls:
                    xo = builder.add(xb_, builder.add(builder.mul(lr.index, xsr), builder.mul(ls.index, xss)))
                    wo = builder.add(wb_, builder.mul(builder.add(builder.mul(lr.index, ss), ls.index), wst))
                    def step(c):
                        wc = builder.add(wo, builder.mul(c, wsc))
                        xc = builder.add(xo, c if m == 1 else builder.mul(c, i64(m)))
                        for line in range(max(1, nv * wl * align // 64) if prefetch else 0):  # (per 64-byte line)
                            _prefetch(builder, builder.gep(wa.data, [builder.add(wc, i64((PREFETCH_BYTES + 64 * line) // align))]))
                        wv = [builder.load(_vector_ptr(builder, wa.data, builder.add(wc, i64(v * wl)), vty),
                                           align=align) for v in range(nv)]
                        for p in range(p_):
                            xp_ = builder.gep(xa.data, [builder.add(xc, xofs[p])])
                            if m == 1:
                                xs = builder.load(xp_, align=align)
                                xv = builder.shuffle_vector(builder.insert_element(undef, xs, i32(0)), undef, splat)
                            else:
                                xt = builder.load(builder.bitcast(xp_, tuple_ty.as_pointer()), align=align)
                                xv = builder.shuffle_vector(xt, ir.Constant(tuple_ty, ir.Undefined), tile)
                            for v in range(nv):
                                builder.store(_fmuladd(builder, xv, wv[v], builder.load(accs[p][v])), accs[p][v])
                    steps = cn if m == 1 else builder.sdiv(cn, i64(m))
                    nu = unroll(p_ * nv)
                    whole = builder.sdiv(steps, i64(nu))
                    with _loop(builder, whole) as cu:
                        for u in range(nu):
                            step(builder.add(builder.mul(cu, i64(nu)), i64(u)))
                    done = builder.mul(whole, i64(nu))
                    with _loop(builder, builder.sub(steps, done)) as cr:  # (the steps % nu left)
                        step(builder.add(done, cr))
            with builder.if_else(builder.icmp_signed("==", mode_, i64(0))) as (to_tmp, to_out):
                with to_tmp:
                    for p in range(p_):
                        for v in range(nv):
                            dst = _vector_ptr(builder, ta.data, i64((p * nv + v) * wl), vty)
                            builder.store(result(p, v), dst, align=align)
                with to_out:
                    with_bias = builder.icmp_signed("==", mode_, i64(1))
                    for p in range(p_):
                        orow = builder.add(ob_, builder.mul(osp, i64(p)))
                        if row_bias:
                            bs = builder.load(builder.gep(ba.data, [builder.add(kb0_, i64(p))]), align=align)
                            bv = builder.shuffle_vector(builder.insert_element(undef, bs, ir.Constant(ir.IntType(32), 0)),
                                                        undef, splat)
                        for v in range(nv):
                            dst = _vector_ptr(builder, oa.data, builder.add(orow, i64(v * wl)), vty)
                            if row_bias:
                                addend = builder.select(with_bias, bv, builder.load(dst, align=align))
                            else:
                                bsrc = _vector_ptr(builder, ba.data, builder.add(kb0_, i64(v * wl)), vty)
                                addend = builder.load(builder.select(with_bias, bsrc, dst), align=align)
                            builder.store(builder.fadd(result(p, v), addend), dst, align=align)
            return context.get_dummy_value()

        return sig, codegen

    name = f"conv_block_{p_}x{nv}x{w_}" if w_ else f"conv_block_{p_}x{nv}_vb{vector_bytes}"
    block.__name__ = name + "_rb" * row_bias + (f"_m{m}" if m > 1 else "") + "_np" * (not prefetch)
    return block


@functools.lru_cache(maxsize=None)
def interleave(m, lanes):
    """An intrinsic ``shuffle(arr, q)``: the ``lanes`` values ``arr[q:q + lanes]`` (``m`` groups of
    ``lanes/m`` channels) from group-major to channel-major order in one register,
    ``arr[q + c*m + i] = old[q + i*(lanes/m) + c]`` (the input order of :func:`conv_block`'s
    ``m``-tuples)."""
    cg = lanes // m
    mask = [(j % m) * cg + j // m for j in range(lanes)]  # new position c*m + i takes old i*cg + c

    @intrinsic
    def shuffle(typingctx, arr, q):
        if not isinstance(arr, types.Array) or not isinstance(arr.dtype, types.Float):
            return None
        sig = types.void(arr, q)

        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            vty = ir.VectorType(context.get_value_type(signature.args[0].dtype), lanes)
            i32 = ir.IntType(32)
            ptr = _vector_ptr(builder, ary.data, context.cast(builder, args[1], signature.args[1], types.int64), vty)
            align = signature.args[0].dtype.bitwidth // 8
            v = builder.load(ptr, align=align)
            out = builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(i32, lanes),
                                                                                         [i32(k) for k in mask]))
            builder.store(out, ptr, align=align)
            return context.get_dummy_value()
        return sig, codegen

    shuffle.__name__ = f"interleave{lanes}_m{m}"
    return shuffle


@functools.lru_cache(maxsize=None)
def fma_chains(n_acc, w_):
    """An intrinsic ``chains(iters, seed) -> float32``: ``n_acc`` independent ``<w_ x float>``
    FMA chains (``acc = acc * m + a``, bounded values) run ``iters`` times; the FMA peak
    probe of :mod:`numbaconv.cpu.peak` (``n_acc * w_ * 2`` flops per iteration)."""
    @intrinsic
    def chains(typingctx, iters, seed):
        if not isinstance(iters, types.Integer) or seed != types.float32:
            return None
        sig = types.float32(iters, seed)

        def codegen(context, builder, signature, args):
            n = context.cast(builder, args[0], signature.args[0], types.int64)
            f32 = ir.FloatType()
            vty = ir.VectorType(f32, w_)

            def splat(value):
                undef = ir.Constant(vty, ir.Undefined)
                mask = ir.Constant(ir.VectorType(ir.IntType(32), w_), [ir.Constant(ir.IntType(32), 0)] * w_)
                return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(ir.IntType(32), 0)),
                                              undef, mask)
            m = splat(ir.Constant(f32, 0.999999))
            a = splat(builder.fmul(args[1], ir.Constant(f32, 1e-6)))
            accs = [cgutils.alloca_once_value(builder, splat(builder.fadd(args[1], ir.Constant(f32, float(i)))))
                    for i in range(n_acc)]
            with cgutils.for_range(builder, n):
                for acc in accs:
                    builder.store(_fmuladd(builder, builder.load(acc), m, a), acc)
            total = builder.load(accs[0])
            for acc in accs[1:]:
                total = builder.fadd(total, builder.load(acc))
            return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))

        return sig, codegen

    return chains


@functools.lru_cache(maxsize=None)
def dot_block(ka, pb, vector_bytes):
    """An intrinsic ``block(wf, cf, acc, wb, cb, n, ldw, ldc)``: the ``ka x pb`` dot products

        acc[a*pb + b] = sum over j < n of wf[wb + a*ldw + j] * cf[cb + b*ldc + j]

    vectorised along the reduction: ``ka*pb`` accumulators of ``w_ = vector_bytes / itemsize``
    lanes, per step ``ka``
    weight-row loads, then per pixel one load and ``ka`` FMAs (``ka*pb + ka + 1``
    registers); the ``n % w_`` tail in scalars; each accumulator summed across its lanes
    once at the end (the sum's order differs from a serial one only by reassociation)."""
    @intrinsic
    def block(typingctx, wf, cf, acc, wb, cb, n, ldw, ldc):
        arrays = (wf, cf, acc)
        if not all(isinstance(a, types.Array) for a in arrays):
            return None
        if len({a.dtype for a in arrays}) != 1 or not isinstance(wf.dtype, types.Float):
            return None
        sig = types.void(wf, cf, acc, wb, cb, n, ldw, ldc)
        w_ = max(1, vector_bytes * 8 // wf.dtype.bitwidth)

        def codegen(context, builder, signature, args):
            argtys = signature.args
            wa, ca, aa = (context.make_array(t)(context, builder, v) for t, v in zip(argtys[:3], args[:3]))
            i64 = ir.IntType(64)
            wb_, cb_, n_, ldw_, ldc_ = (context.cast(builder, args[i], argtys[i], types.int64) for i in range(3, 8))
            fty = context.get_value_type(wf.dtype)
            vty = ir.VectorType(fty, w_)
            align = wf.dtype.bitwidth // 8
            zero = ir.Constant(vty, [ir.Constant(fty, 0.0)] * w_)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(pb)] for _ in range(ka)]
            tails = [[cgutils.alloca_once_value(builder, ir.Constant(fty, 0.0)) for _ in range(pb)]
                     for _ in range(ka)]
            wrow = [builder.add(wb_, builder.mul(ldw_, i64(a))) for a in range(ka)]
            crow = [builder.add(cb_, builder.mul(ldc_, i64(b))) for b in range(pb)]
            steps = builder.sdiv(n_, i64(w_))
            with _loop(builder, steps) as step:
                j = builder.mul(step, i64(w_))
                wv = [builder.load(_vector_ptr(builder, wa.data, builder.add(wrow[a], j), vty), align=align)
                      for a in range(ka)]
                for a in range(ka):  # each weight row is a stream from memory (see PREFETCH_BYTES)
                    _prefetch(builder, builder.gep(wa.data, [builder.add(wrow[a], builder.add(j, i64(PREFETCH_BYTES // align)))]))
                for b in range(pb):
                    cv = builder.load(_vector_ptr(builder, ca.data, builder.add(crow[b], j), vty), align=align)
                    for a in range(ka):
                        builder.store(_fmuladd(builder, wv[a], cv, builder.load(accs[a][b])), accs[a][b])
            with _loop(builder, builder.sub(n_, builder.mul(steps, i64(w_)))) as tail:
                j = builder.add(builder.mul(steps, i64(w_)), tail)
                ws = [builder.load(builder.gep(wa.data, [builder.add(wrow[a], j)])) for a in range(ka)]
                for b in range(pb):
                    c = builder.load(builder.gep(ca.data, [builder.add(crow[b], j)]))
                    for a in range(ka):
                        builder.store(_fmuladd(builder, ws[a], c, builder.load(tails[a][b])), tails[a][b])
            for a in range(ka):
                for b in range(pb):
                    v = builder.load(accs[a][b])
                    total = builder.load(tails[a][b])
                    for lane in range(w_):
                        total = builder.fadd(total, builder.extract_element(v, ir.Constant(ir.IntType(32), lane)))
                    builder.store(total, builder.gep(aa.data, [i64(a * pb + b)]))
            return context.get_dummy_value()

        return sig, codegen

    block.__name__ = f"dot_block_{ka}x{pb}_{vector_bytes}"
    return block


@intrinsic
def transpose8(typingctx, src, dst, s0, ss, d0, ds):
    """``dst[d0 + j*ds + i] = src[s0 + i*ss + j]`` for ``i, j < 8``: an 8 x 8 block transposed
    in registers (8 vector loads, 24 shuffles, 8 vector stores) -- NCHW planes to NHWC rows
    at memory speed, where element-wise copies ran 4x slower."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype):
        return None
    sig = types.void(src, dst, s0, ss, d0, ds)

    def codegen(context, builder, signature, args):
        sa, da = (context.make_array(signature.args[i])(context, builder, args[i]) for i in (0, 1))
        s0_, ss_, d0_, ds_ = (context.cast(builder, args[i], signature.args[i], types.int64) for i in range(2, 6))
        i64, i32 = ir.IntType(64), ir.IntType(32)
        vty = ir.VectorType(context.get_value_type(src.dtype), 8)
        align = src.dtype.bitwidth // 8

        def shuffle(a, b, mask):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 8), [i32(m) for m in mask]))

        rows = [builder.load(_vector_ptr(builder, sa.data, builder.add(s0_, builder.mul(ss_, i64(i))), vty),
                             align=align) for i in range(8)]
        pairs = []  # interleave rows 2k, 2k+1: (a0 b0 a1 b1 | a4 b4 a5 b5), (a2 b2 a3 b3 | a6 b6 a7 b7)
        for k in range(0, 8, 2):
            pairs += [shuffle(rows[k], rows[k + 1], [0, 8, 1, 9, 4, 12, 5, 13]),
                      shuffle(rows[k], rows[k + 1], [2, 10, 3, 11, 6, 14, 7, 15])]
        quads = []  # (a0 b0 c0 d0 | a4 b4 c4 d4), (a1 .. d1 | a5 .. d5), ... for rows 0-3, then 4-7
        for k in (0, 4):
            for m in (0, 1):
                quads += [shuffle(pairs[k + m], pairs[k + 2 + m], [0, 1, 8, 9, 4, 5, 12, 13]),
                          shuffle(pairs[k + m], pairs[k + 2 + m], [2, 3, 10, 11, 6, 7, 14, 15])]
        for j in range(4):
            lo, hi = quads[j], quads[4 + j]
            for col, mask in ((j, [0, 1, 2, 3, 8, 9, 10, 11]), (j + 4, [4, 5, 6, 7, 12, 13, 14, 15])):
                dst_ptr = _vector_ptr(builder, da.data, builder.add(d0_, builder.mul(ds_, i64(col))), vty)
                builder.store(shuffle(lo, hi, mask), dst_ptr, align=align)
        return context.get_dummy_value()

    return sig, codegen


@functools.lru_cache(maxsize=None)
def dw3x3_block(p_, sw, vector_bytes):
    """An intrinsic ``block(xf, wf, bias, of, xb, r1, r2, ob, uk, ucs)``: ``p_`` neighbouring
    output pixels (column stride ``sw``) of a channels-last 3x3 depthwise layer, all ``uk``
    channels::

        of[ob + p*uk + k] = bias[k] + sum over r, s < 3 of
            xf[row_r + (p*sw + s)*ucs + k] * wf[(3r + s)*uk + k]      (row_r: xb, r1, r2)

    in vectors of ``vector_bytes`` along the channels (9 weight vectors, ``p_`` accumulators;
    every load of a channel group before its stores, so the overlapping input columns are
    loaded once), then a scalar loop for the last ``uk % lanes`` channels.  Each output is
    one FMA chain in tap order (bias first), as the scalar formula with ``contract``."""
    @intrinsic
    def block(typingctx, xf, wf, bias, of, xb, r1, r2, ob, uk, ucs):
        arrays = (xf, wf, bias, of)
        if not all(isinstance(a, types.Array) for a in arrays):
            return None
        if len({a.dtype for a in arrays}) != 1 or not isinstance(xf.dtype, types.Float):
            return None
        sig = types.void(xf, wf, bias, of, xb, r1, r2, ob, uk, ucs)
        w_ = max(1, vector_bytes * 8 // xf.dtype.bitwidth)
        ncol = (p_ - 1) * sw + 3

        def codegen(context, builder, signature, args):
            argtys = signature.args
            xa, wa, ba, oa = (context.make_array(t)(context, builder, v) for t, v in zip(argtys[:4], args[:4]))
            i64 = ir.IntType(64)
            xb_, r1_, r2_, ob_, uk_, ucs_ = (context.cast(builder, args[i], argtys[i], types.int64)
                                              for i in range(4, 10))
            rows = (xb_, r1_, r2_)
            fty = context.get_value_type(xf.dtype)
            align = xf.dtype.bitwidth // 8
            nvec = builder.sub(uk_, builder.srem(uk_, i64(w_)))

            def group(kk, ty, load):
                """One channel group at channel ``kk``: values of type ``ty`` via ``load``."""
                b = load(ba.data, kk)
                wv = [load(wa.data, builder.add(builder.mul(uk_, i64(t)), kk)) for t in range(9)]
                xs = [[load(xa.data, builder.add(builder.add(rows[r], builder.mul(ucs_, i64(c))), kk))
                       for c in range(ncol)] for r in range(3)]
                accs = []
                for p in range(p_):
                    acc = b
                    for r in range(3):
                        for s in range(3):
                            acc = _fmuladd(builder, xs[r][p * sw + s], wv[3 * r + s], acc)
                    accs.append(acc)
                for p, acc in enumerate(accs):
                    dst = builder.add(builder.add(ob_, builder.mul(uk_, i64(p))), kk)
                    ptr = builder.gep(oa.data, [dst])
                    builder.store(acc, builder.bitcast(ptr, ty.as_pointer()) if ty != fty else ptr, align=align)

            vty = ir.VectorType(fty, w_)
            with _loop(builder, builder.sdiv(nvec, i64(w_))) as step:
                group(builder.mul(step, i64(w_)), vty,
                      lambda base, i: builder.load(_vector_ptr(builder, base, i, vty), align=align))
            with _loop(builder, builder.sub(uk_, nvec), vectorize=False) as t:  # (a remainder: see _loop)
                group(builder.add(nvec, t), fty, lambda base, i: builder.load(builder.gep(base, [i])))
            return context.get_dummy_value()

        return sig, codegen

    block.__name__ = f"dw3x3_block_{p_}_s{sw}_{vector_bytes}"
    return block


@functools.lru_cache(maxsize=None)
def tap_sweep(loads, rows, vector_bytes):
    """An intrinsic ``sweep(buf, offs, extra, wf, kk, b, of, dst, dstride, q0, n)``: rows of an
    NCHW depthwise 3x3 output plane swept along ``j < n`` from the plane's stride-phase copy
    ``buf``, every tap a fixed shift (:func:`numbaconv.cpu.depthwise._plane_phases`)::

        of[dst + r*dstride + j] = b + sum over t < 9 of wf[kk + t] * X[rows[r][t]][j]
        X[l][j] = buf[q0 + j + offs[loads[l][0]] + loads[l][1] * extra]

    ``loads`` (pairs ``(tap, multiple of extra)``) and ``rows`` (per output row, the load of
    each tap) are the sweep's structure: two output rows that share input rows load them
    once (the row-pair sweeps).  In vectors of ``vector_bytes`` along ``j`` (the last ``n %
    lanes`` in one masked step), each output one FMA chain in tap order from ``b``.  Written
    as vectors, the sweeps compile in a fraction of the time LLVM took to vectorise the same
    scalar loops (0.8 s of a fresh install's first NCHW depthwise layer).  Under
    ``NUMBA_BOUNDSCHECK=1`` every load and store range is checked (``IndexError``)."""
    from numba.core import config

    @intrinsic
    def sweep(typingctx, buf, offs, extra, wf, kk, b, of, dst, dstride, q0, n):
        arrays = (buf, wf, of)
        if not (all(isinstance(a, types.Array) for a in arrays) and isinstance(offs, types.Array)
                and isinstance(offs.dtype, types.Integer)):
            return None
        if len({a.dtype for a in arrays}) != 1 or not isinstance(buf.dtype, types.Float):
            return None
        sig = types.void(buf, offs, extra, wf, kk, b, of, dst, dstride, q0, n)
        w_ = max(1, vector_bytes * 8 // buf.dtype.bitwidth)

        def codegen(context, builder, signature, args):
            argtys = signature.args
            ba, oa, wa, fa = (context.make_array(argtys[i])(context, builder, args[i]) for i in (0, 1, 3, 6))
            i64 = ir.IntType(64)
            extra_, kk_, dst_, dstride_, q0_, n_ = (context.cast(builder, args[i], argtys[i], types.int64)
                                                    for i in (2, 4, 7, 8, 9, 10))
            bval = context.cast(builder, args[5], argtys[5], buf.dtype)
            align = buf.dtype.bitwidth // 8
            vty = _vector_type(context, buf.dtype, w_)
            offv = [builder.add(builder.load(builder.gep(oa.data, [i64(t)])), builder.mul(extra_, i64(mult)))
                    for t, mult in loads]
            starts = [builder.add(q0_, o) for o in offv]
            dsts = [builder.add(dst_, builder.mul(dstride_, i64(r))) for r in range(len(rows))]
            if config.BOUNDSCHECK:
                _check_runs(context, builder, [(ba, st) for st in starts] + [(fa, d) for d in dsts], n_)
            wv = [_splat(builder, builder.load(builder.gep(wa.data, [builder.add(kk_, i64(t))])), vty)
                  for t in range(9)]
            bv = _splat(builder, bval, vty)

            def body(j, load, store):
                x = [load(ba.data, builder.add(st, j)) for st in starts]
                for r, taps in enumerate(rows):
                    acc = bv
                    for t in range(9):
                        acc = _fmuladd(builder, x[taps[t]], wv[t], acc)
                    store(acc, fa.data, builder.add(dsts[r], j))

            _vector_steps(builder, n_, vty, align, body)
            return context.get_dummy_value()
        return sig, codegen

    sweep.__name__ = f"tap_sweep_{len(loads)}_{len(rows)}_{vector_bytes}"
    return sweep


@functools.lru_cache(maxsize=None)
def strided_runs(vector_bytes):
    """An intrinsic ``copy(dst, d_even, d_odd, src, s0, stride, n)`` on flat arrays of one
    dtype: for ``stride == 2`` the deinterleave ``dst[d_even + t] = src[s0 + 2t]``,
    ``dst[d_odd + t] = src[s0 + 2t + 1]`` (``t < n``) in vectors of ``vector_bytes`` (two
    loads, two shuffles, two stores per step); for any other stride the gather
    ``dst[d_even + t] = src[s0 + t*stride]`` (``d_odd`` unused) as a plain scalar loop.  The
    remainders and the gather are loops LLVM is told not to vectorise: the stride-phase
    copy of the NCHW depthwise kernels (:func:`numbaconv.cpu.depthwise._fill_phases`) spent
    0.4 s of its compile on LLVM vectorising its copy loops.  Under ``NUMBA_BOUNDSCHECK=1``
    the ranges are checked (``IndexError``)."""
    from numba.core import config

    @intrinsic
    def copy(typingctx, dst, d_even, d_odd, src, s0, stride, n):
        if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype
                and isinstance(dst.dtype, types.Float)):
            return None
        sig = types.void(dst, d_even, d_odd, src, s0, stride, n)
        w_ = max(1, vector_bytes * 8 // src.dtype.bitwidth)

        def codegen(context, builder, signature, args):
            argtys = signature.args
            da, sa = (context.make_array(argtys[i])(context, builder, args[i]) for i in (0, 3))
            i64 = ir.IntType(64)
            de, do, s0_, st, n_ = (context.cast(builder, args[i], argtys[i], types.int64) for i in (1, 2, 4, 5, 6))
            fty = context.get_value_type(src.dtype)
            align = src.dtype.bitwidth // 8
            vty = ir.VectorType(fty, w_)
            two = builder.icmp_signed("==", st, i64(2))
            if config.BOUNDSCHECK:
                last = builder.add(s0_, builder.mul(builder.sub(n_, i64(1)), st))
                odd = builder.select(two, do, de)
                _check_runs(context, builder, [(da, de), (da, odd)], n_)
                _check_runs(context, builder, [(sa, s0_), (sa, builder.select(two, builder.add(last, i64(1)), last))],
                            builder.select(builder.icmp_signed(">", n_, i64(0)), i64(1), i64(0)))
            pair, other = builder.append_basic_block("pairs"), builder.append_basic_block("gather")
            done = builder.append_basic_block("copied")
            builder.cbranch(two, pair, other)
            builder.position_at_end(pair)
            nvec = builder.sub(n_, builder.srem(n_, i64(w_)))
            i32 = ir.IntType(32)
            evens = ir.Constant(ir.VectorType(i32, w_), [i32(2 * k) for k in range(w_)])
            odds = ir.Constant(ir.VectorType(i32, w_), [i32(2 * k + 1) for k in range(w_)])
            with _loop(builder, builder.sdiv(nvec, i64(w_))) as step:
                t = builder.mul(step, i64(w_))
                at = builder.add(s0_, builder.add(t, t))
                lo = builder.load(_vector_ptr(builder, sa.data, at, vty), align=align)
                hi = builder.load(_vector_ptr(builder, sa.data, builder.add(at, i64(w_)), vty), align=align)
                for pick, d in ((evens, de), (odds, do)):
                    builder.store(builder.shuffle_vector(lo, hi, pick),
                                  _vector_ptr(builder, da.data, builder.add(d, t), vty), align=align)
            with _loop(builder, builder.sub(n_, nvec), vectorize=False) as r:
                t = builder.add(nvec, r)
                at = builder.add(s0_, builder.add(t, t))
                builder.store(builder.load(builder.gep(sa.data, [at])), builder.gep(da.data, [builder.add(de, t)]))
                builder.store(builder.load(builder.gep(sa.data, [builder.add(at, i64(1))])),
                              builder.gep(da.data, [builder.add(do, t)]))
            builder.branch(done)
            builder.position_at_end(other)
            with _loop(builder, n_, vectorize=False) as t:
                v = builder.load(builder.gep(sa.data, [builder.add(s0_, builder.mul(t, st))]))
                builder.store(v, builder.gep(da.data, [builder.add(de, t)]))
            builder.branch(done)
            builder.position_at_end(done)
            return context.get_dummy_value()
        return sig, codegen

    copy.__name__ = f"strided_runs_{vector_bytes}"
    return copy


@intrinsic
def copy2d(typingctx, src, dst, s0, si, sj, d0, di, dj, ni, nj):
    """``dst[d0 + i*di + j*dj] = src[s0 + i*si + j*sj]`` for ``i < ni, j < nj`` (flat arrays of
    one dtype, non-negative strides) as plain scalar loops that LLVM is told not to
    vectorise: the edges of :func:`numbaconv.cpu._blocking.transpose_block` (fewer than 8 rows
    or columns), which LLVM vectorised -- strided on both sides -- in every kernel that
    transposes, for a few values per row.  Under ``NUMBA_BOUNDSCHECK=1`` both ranges are
    checked (``IndexError``)."""
    from numba.core import config
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array) and src.dtype == dst.dtype):
        return None
    sig = types.void(src, dst, s0, si, sj, d0, di, dj, ni, nj)

    def codegen(context, builder, signature, args):
        argtys = signature.args
        sa, da = (context.make_array(argtys[i])(context, builder, args[i]) for i in (0, 1))
        i64 = ir.IntType(64)
        s0_, si_, sj_, d0_, di_, dj_, ni_, nj_ = (context.cast(builder, args[i], argtys[i], types.int64)
                                                  for i in range(2, 10))
        if config.BOUNDSCHECK:
            n = builder.select(builder.and_(builder.icmp_signed(">", ni_, i64(0)), builder.icmp_signed(">", nj_, i64(0))),
                               i64(1), i64(0))

            def last(base, a, b):
                return builder.add(base, builder.add(builder.mul(builder.sub(ni_, i64(1)), a),
                                                     builder.mul(builder.sub(nj_, i64(1)), b)))
            _check_runs(context, builder, [(sa, s0_), (sa, last(s0_, si_, sj_)), (da, d0_), (da, last(d0_, di_, dj_))], n)
        with _loop(builder, ni_, vectorize=False) as i:
            srow = builder.add(s0_, builder.mul(i, si_))
            drow = builder.add(d0_, builder.mul(i, di_))
            with _loop(builder, nj_, vectorize=False) as j:
                v = builder.load(builder.gep(sa.data, [builder.add(srow, builder.mul(j, sj_))]))
                builder.store(v, builder.gep(da.data, [builder.add(drow, builder.mul(j, dj_))]))
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def scatter_block(typingctx, of, tmp, ob, os_p, bias, kb0, nk, np_, first, vw):
    """``of[ob + p*os_p + v] = tmp[p*vw + v] + (bias[kb0 + v] if first else of[ob + p*os_p + v])``
    for ``p < np_, v < nk``: the stores of a partial register block (``tiled``'s micro-kernels
    store whole ones themselves) as scalar loops LLVM is told not to vectorise (it vectorised
    them, strided, in every driver: 0.15-0.2 s of a fresh install's compile for a few
    values per row).  Under ``NUMBA_BOUNDSCHECK=1`` the ranges are checked (``IndexError``)."""
    from numba.core import config
    if not (isinstance(of, types.Array) and isinstance(tmp, types.Array) and isinstance(bias, types.Array)
            and of.dtype == tmp.dtype == bias.dtype):
        return None
    sig = types.void(of, tmp, ob, os_p, bias, kb0, nk, np_, first, vw)

    def codegen(context, builder, signature, args):
        argtys = signature.args
        oa, ta, ba = (context.make_array(argtys[i])(context, builder, args[i]) for i in (0, 1, 4))
        i64 = ir.IntType(64)
        ob_, os_, kb_, nk_, np__, vw_ = (context.cast(builder, args[i], argtys[i], types.int64)
                                         for i in (2, 3, 5, 6, 7, 9))
        first_ = context.cast(builder, args[8], argtys[8], types.boolean)
        if config.BOUNDSCHECK:
            n = builder.select(builder.and_(builder.icmp_signed(">", nk_, i64(0)), builder.icmp_signed(">", np__, i64(0))),
                               i64(1), i64(0))
            lastp = builder.sub(np__, i64(1))
            lastv = builder.sub(nk_, i64(1))
            _check_runs(context, builder, [(oa, ob_), (oa, builder.add(ob_, builder.add(builder.mul(lastp, os_), lastv))),
                                           (ta, builder.add(builder.mul(lastp, vw_), lastv)), (ba, kb_),
                                           (ba, builder.add(kb_, lastv))], n)
        with _loop(builder, np__, vectorize=False) as p:
            orow = builder.add(ob_, builder.mul(p, os_))
            trow = builder.mul(p, vw_)
            with _loop(builder, nk_, vectorize=False) as v:
                optr = builder.gep(oa.data, [builder.add(orow, v)])
                t = builder.load(builder.gep(ta.data, [builder.add(trow, v)]))
                b = builder.select(first_, builder.load(builder.gep(ba.data, [builder.add(kb_, v)])), builder.load(optr))
                builder.store(builder.fadd(t, b), optr)
        return context.get_dummy_value()
    return sig, codegen


@functools.lru_cache(maxsize=None)
def channel_taps(taps, vector_bytes):
    """An intrinsic ``run(of, ob, xf, xs, wf, ws, bias, b0, init, n)``: ``taps`` depthwise taps
    of ``n`` contiguous channels-last values at once::

        of[ob + k] = (bias[b0 + k] if init else of[ob + k]) + sum over t of xf[xs[t] + k] * wf[ws[t] + k]

    (``xs``, ``ws``: tuples of ``taps`` start offsets; ``taps`` may be 0: a fill from
    ``bias``) in vectors of ``vector_bytes`` (the last ``n % lanes`` in one masked step), one
    FMA chain per value in tap order.  The NHWC depthwise kernels' pixel and run loops
    (:func:`numbaconv.cpu.depthwise._row_nhwc`), which LLVM vectorised loop by loop: 1.8 s of
    a fresh install's first 5x5 layer.  Under ``NUMBA_BOUNDSCHECK=1`` every range is checked
    (``IndexError``)."""
    from numba.core import config

    @intrinsic
    def run(typingctx, of, ob, xf, xs, wf, ws, bias, b0, init, n):
        arrays = (of, xf, wf, bias)
        if not all(isinstance(a, types.Array) for a in arrays) or len({a.dtype for a in arrays}) != 1:
            return None
        if not (isinstance(xs, types.BaseTuple) and isinstance(ws, types.BaseTuple) and len(xs) == len(ws) == taps):
            return None
        sig = types.void(of, ob, xf, xs, wf, ws, bias, b0, init, n)
        w_ = max(1, vector_bytes * 8 // of.dtype.bitwidth)

        def codegen(context, builder, signature, args):
            argtys = signature.args
            oa, xa, wa, ba = (context.make_array(argtys[i])(context, builder, args[i]) for i in (0, 2, 4, 6))
            ob_, b0_, n_ = (context.cast(builder, args[i], argtys[i], types.int64) for i in (1, 7, 9))
            init_ = context.cast(builder, args[8], argtys[8], types.boolean)
            xs_ = [context.cast(builder, builder.extract_value(args[3], t), argtys[3][t], types.int64) for t in range(taps)]
            ws_ = [context.cast(builder, builder.extract_value(args[5], t), argtys[5][t], types.int64) for t in range(taps)]
            if config.BOUNDSCHECK:
                _check_runs(context, builder, [(oa, ob_), (ba, b0_)] + [(xa, v) for v in xs_] + [(wa, v) for v in ws_], n_)
            align = of.dtype.bitwidth // 8
            vty = _vector_type(context, of.dtype, w_)

            def body(k, load, store):
                o = builder.add(ob_, k)
                acc = builder.select(init_, load(ba.data, builder.add(b0_, k)), load(oa.data, o))
                for t in range(taps):
                    acc = _fmuladd(builder, load(xa.data, builder.add(xs_[t], k)), load(wa.data, builder.add(ws_[t], k)),
                                   acc)
                store(acc, oa.data, o)

            _vector_steps(builder, n_, vty, align, body)
            return context.get_dummy_value()
        return sig, codegen

    run.__name__ = f"channel_taps_{taps}_{vector_bytes}"
    return run


@functools.lru_cache(maxsize=None)
def run_copies(vector_bytes):
    """Intrinsics ``(copy(dst, d0, src, s0, n), fill(dst, d0, n, value))`` on flat C-contiguous
    arrays: ``dst[d0:d0 + n] = src[s0:s0 + n]`` and ``dst[d0:d0 + n] = value`` in vectors of
    ``vector_bytes`` (the last ``n % lanes`` in one masked step; nothing for ``n <= 0``): short
    runs (a pixel's channels, a block's weights) without a library call, and no scalar loop
    for LLVM to vectorise again in every kernel that copies (numbaconv's copy loops were
    most of several helpers' compile time).  Under ``NUMBA_BOUNDSCHECK=1`` the ranges are
    checked (``IndexError``)."""
    from numba.core import config

    def flat_float(t):
        return isinstance(t, types.Array) and t.ndim == 1 and t.layout == "C" and isinstance(t.dtype, types.Float)

    @intrinsic
    def copy(typingctx, dst, d0, src, s0, n):
        if not (flat_float(dst) and flat_float(src) and dst.dtype == src.dtype):
            return None
        w_ = max(1, vector_bytes * 8 // dst.dtype.bitwidth)

        def codegen(context, builder, signature, args):
            argtys = signature.args
            da, sa = (context.make_array(argtys[i])(context, builder, args[i]) for i in (0, 2))
            d0_, s0_, n_ = (context.cast(builder, args[i], argtys[i], types.int64) for i in (1, 3, 4))
            if config.BOUNDSCHECK:
                _check_runs(context, builder, [(da, d0_), (sa, s0_)], n_)

            def body(k, load, store):
                store(load(sa.data, builder.add(s0_, k)), da.data, builder.add(d0_, k))
            _vector_steps(builder, n_, _vector_type(context, dst.dtype, w_), dst.dtype.bitwidth // 8, body)
            return context.get_dummy_value()
        return types.void(dst, d0, src, s0, n), codegen

    @intrinsic
    def fill(typingctx, dst, d0, n, value):
        if not flat_float(dst):
            return None
        w_ = max(1, vector_bytes * 8 // dst.dtype.bitwidth)

        def codegen(context, builder, signature, args):
            argtys = signature.args
            da = context.make_array(argtys[0])(context, builder, args[0])
            d0_, n_ = (context.cast(builder, args[i], argtys[i], types.int64) for i in (1, 2))
            v = context.cast(builder, args[3], argtys[3], dst.dtype)
            if config.BOUNDSCHECK:
                _check_runs(context, builder, [(da, d0_)], n_)

            vty = _vector_type(context, dst.dtype, w_)

            def body(k, load, store):
                store(_splat(builder, v, vty), da.data, builder.add(d0_, k))
            _vector_steps(builder, n_, vty, dst.dtype.bitwidth // 8, body)
            return context.get_dummy_value()
        return types.void(dst, d0, n, value), codegen

    return copy, fill


def _vector_type(context, dtype, w_):
    """``<w_ x dtype>`` in LLVM."""
    return ir.VectorType(context.get_value_type(dtype), w_)


def _vector_steps(builder, n, vty, align, body):
    """``body(index, load, store)`` over ``[0, n)`` (``i64``) in vectors of ``vty``, then one
    masked step for the last ``n % lanes`` (nothing when none are left): ``load(base, i)``
    and ``store(value, base, i)`` read and write a vector at element ``i`` of ``base``, the
    masked ones only the lanes in range (no fault past an array's end)."""
    i64 = ir.IntType(64)
    w_ = vty.count
    nvec = builder.sub(n, builder.srem(n, i64(w_)))
    with _loop(builder, builder.sdiv(nvec, i64(w_))) as step:
        body(builder.mul(step, i64(w_)),
             lambda base, i: builder.load(_vector_ptr(builder, base, i, vty), align=align),
             lambda v, base, i: builder.store(v, _vector_ptr(builder, base, i, vty), align=align))
    rem = builder.sub(n, nvec)
    with builder.if_then(builder.icmp_signed(">", rem, i64(0))):
        mask = _lane_mask(builder, rem, w_)
        zero_v = _splat_constant(vty, 0.0)
        body(nvec,
             lambda base, i: _masked_load(builder, _vector_ptr(builder, base, i, vty), mask, zero_v, align),
             lambda v, base, i: _masked_store(builder, v, _vector_ptr(builder, base, i, vty), mask, align))


def _splat(builder, value, vty):
    """``value`` (a scalar) in every lane of ``vty``."""
    i32 = ir.IntType(32)
    v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, i32(0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, vty.count), [i32(0)] * vty.count))


def _lane_mask(builder, count, w_):
    """``<w_ x i1>``: lanes ``< count``."""
    i64, i32 = ir.IntType(64), ir.IntType(32)
    idx = ir.Constant(ir.VectorType(i64, w_), [i64(k) for k in range(w_)])
    cv = builder.insert_element(ir.Constant(ir.VectorType(i64, w_), ir.Undefined), count, i32(0))
    cv = builder.shuffle_vector(cv, cv, ir.Constant(ir.VectorType(i32, w_), [i32(0)] * w_))
    return builder.icmp_unsigned("<", idx, cv)


def _check_runs(context, builder, runs, n):
    """``IndexError`` unless every ``[start, start + n)`` of ``runs`` (``(array, start)``, ``i64``
    starts) lies within its array (nothing to check for ``n <= 0``): the bounds check of every
    run-based helper here and in :mod:`numbaconv.cpu._jit` under ``NUMBA_BOUNDSCHECK=1``."""
    i64 = ir.IntType(64)
    bad = ir.Constant(ir.IntType(1), 0)
    for ary, start in runs:
        size = builder.extract_value(ary.shape, 0)
        bad = builder.or_(bad, builder.or_(builder.icmp_signed("<", start, i64(0)),
                                           builder.icmp_signed(">", builder.add(start, n), size)))
    with builder.if_then(builder.and_(builder.icmp_signed(">", n, i64(0)), bad), likely=False):
        context.call_conv.return_user_exc(builder, IndexError, ("a numbaconv copy or sweep ran out of bounds",))


def _masked_name(op, vty, ptr_type):
    """``llvm.masked.<op>`` mangled for ``vty`` through ``ptr_type`` (typed or opaque pointers)."""
    v = f"v{vty.count}f{64 if isinstance(vty.element, ir.DoubleType) else 32}"
    return f"llvm.masked.{op}.{v}.p0" + ("" if getattr(ptr_type, "is_opaque", False) else v)


def _masked_load(builder, ptr, mask, passthru, align):
    """``llvm.masked.load``: the lanes of ``mask`` from ``ptr``, ``passthru`` elsewhere (the
    other lanes are not read: no fault past an array's end)."""
    vty = passthru.type
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(vty, [ptr.type, i32, mask.type, vty])
    fn = cgutils.get_or_insert_function(builder.module, fnty, _masked_name("load", vty, ptr.type))
    return builder.call(fn, [ptr, i32(align), mask, passthru])


def _masked_store(builder, value, ptr, mask, align):
    """``llvm.masked.store``: the lanes of ``mask`` of ``value`` to ``ptr``."""
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [value.type, ptr.type, i32, mask.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, _masked_name("store", value.type, ptr.type))
    builder.call(fn, [value, ptr, i32(align), mask])


def _splat_constant(ty, value):
    """``value`` as a constant of ``ty`` (a float type or a vector of one)."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [ir.Constant(ty.element, value)] * ty.count)
    return ir.Constant(ty, value)


def _combine(builder, coefs, values):
    """``sum(c * v)`` over the non-zero constant ``coefs``: adds and subtractions for +-1,
    FMAs otherwise (``None`` when every coefficient is zero)."""
    acc = None
    for c, v in zip(coefs, values):
        if c == 0:
            continue
        if acc is None:
            acc = v if c == 1 else builder.fneg(v) if c == -1 else builder.fmul(_splat_constant(v.type, c), v)
        elif c in (1, -1):
            acc = builder.fadd(acc, v) if c == 1 else builder.fsub(acc, v)
        else:
            acc = _fmuladd(builder, _splat_constant(v.type, c), v, acc)
    return acc


@functools.lru_cache(maxsize=None)
def tile_transform(mat, vector_bytes, with_bias):
    """An intrinsic ``block(src, dst, bias, s0, sa, sb, d0, di, dj, n, kb) -> float``: the 2-D
    transform ``Y = L D L^T`` of a tile, channel by channel (``L = mat``, a tuple of rows of
    constants: Winograd's ``B^T`` or ``A^T``)::

        dst[d0 + i*di + j*dj + c] = (bias[kb + c] +) sum over a, b of
            L[i][a] * L[j][b] * src[s0 + a*sa + b*sb + c]            for c < n

    in vectors of ``vector_bytes`` along ``c`` (the last ``n % lanes`` in one masked step): per channel
    vector the tile's ``a x a`` loads, the row pass, the column pass (zero coefficients
    skipped, +-1 as adds), ``i x j`` stores.  Returns ``0 * sum(Y)`` over everything stored:
    0 when every result is finite, NaN otherwise (the caller's cheap non-finite check)."""
    rows = tuple(tuple(float(c) for c in row) for row in mat)
    mo, mi = len(rows), len(rows[0])

    @intrinsic
    def block(typingctx, src, dst, bias, s0, sa, sb, d0, di, dj, n, kb):
        arrays = (src, dst, bias)
        if not all(isinstance(a, types.Array) for a in arrays):
            return None
        if len({a.dtype for a in arrays}) != 1 or not isinstance(src.dtype, types.Float):
            return None
        sig = src.dtype(src, dst, bias, s0, sa, sb, d0, di, dj, n, kb)
        w_ = max(1, vector_bytes * 8 // src.dtype.bitwidth)

        def codegen(context, builder, signature, args):
            argtys = signature.args
            sa_, da_, ba_ = (context.make_array(t)(context, builder, v) for t, v in zip(argtys[:3], args[:3]))
            i64 = ir.IntType(64)
            s0_, ssa, ssb, d0_, sdi, sdj, n_, kb_ = (context.cast(builder, args[i], argtys[i], types.int64)
                                                    for i in range(3, 11))
            fty = context.get_value_type(src.dtype)
            align = src.dtype.bitwidth // 8
            vty = ir.VectorType(fty, w_)
            check = cgutils.alloca_once_value(builder, ir.Constant(vty, [ir.Constant(fty, 0.0)] * w_))
            scheck = cgutils.alloca_once_value(builder, ir.Constant(fty, 0.0))

            def tile(c, load, store, chk):
                d = [[load(sa_.data, builder.add(builder.add(s0_, builder.mul(ssa, i64(a))),
                                                 builder.add(builder.mul(ssb, i64(b)), c)))
                      for b in range(mi)] for a in range(mi)]
                e = [[_combine(builder, rows[j], d[a]) for j in range(mo)] for a in range(mi)]  # D L^T
                total = None
                for i in range(mo):
                    for j in range(mo):
                        y = _combine(builder, rows[i], [e[a][j] for a in range(mi)])
                        if with_bias:
                            y = builder.fadd(y, load(ba_.data, builder.add(kb_, c)))
                        dst_i = builder.add(builder.add(d0_, builder.mul(sdi, i64(i))),
                                            builder.add(builder.mul(sdj, i64(j)), c))
                        store(y, da_.data, dst_i)
                        total = y if total is None else builder.fadd(total, y)
                zero = _splat_constant(total.type, 0.0)
                builder.store(builder.fadd(builder.load(chk), builder.fmul(total, zero)), chk)

            # the last n % lanes channels: one masked vector step (a scalar copy of the
            # unrolled transform doubled its code, ~1.3 s of a first call's compile)
            _vector_steps(builder, n_, vty, align, lambda c, load, store: tile(c, load, store, check))
            v = builder.load(check)
            total = builder.load(scheck)
            for lane in range(w_):
                total = builder.fadd(total, builder.extract_element(v, ir.Constant(ir.IntType(32), lane)))
            return total

        return sig, codegen

    block.__name__ = f"tile_transform_{mo}x{mi}_{vector_bytes}{'_bias' if with_bias else ''}"
    return block
