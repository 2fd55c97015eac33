"""Explicit-vector register blocks: LLVM vector IR emitted from ``@intrinsic``.

Numba has no vector type.  The first micro-kernels held ``P x V`` scalar accumulators and
left LLVM's SLP vectoriser to pack them into registers; that took ~9 s to compile per
kernel, and on Intel server cores (whose LLVM models carry ``prefer-256-bit``) SLP packed
them into ymm halves instead of zmm, doubling the FMAs and spilling.  Here the register
plan is written down as vectors: ``<W x float>`` weight loads, one broadcast per input
value, ``llvm.fma`` on ``<W x float>`` accumulators.  Explicit vector types are legal at
their full width whatever the vectorisers prefer, so the plan compiles to the same
registers on every x86-64 family (``W`` is chosen from the width of the target Numba
compiles for: :func:`target_vector_bytes`), and LLVM has nothing to search: a block
compiles in well under a second.

The accumulators live in ``alloca`` slots of the function's entry block; LLVM's ``mem2reg``
turns them into phi values carried around the reduction loop (registers, no memory).
"""

import contextlib
import functools
import itertools

from llvmlite import binding as ll
from llvmlite import ir
from numba.core import cgutils, types
from numba.core.extending import intrinsic

__all__ = ["conv_block", "target_vector_bytes", "target_description"]


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
    name = f"llvm.fmuladd.v{vty.count}f{64 if isinstance(vty.element, ir.DoubleType) else 32}"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), name)
    return builder.call(fn, [a, b, c])


_loop_ids = itertools.count()


@contextlib.contextmanager
def _loop(builder, count):
    """``for i in range(count)`` (``i64``), not unrolled by LLVM: the register plan is the
    unroll (an unrolled copy would keep two steps' broadcasts live and spill)."""
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
    loop_id = module.add_metadata([tag, off])
    loop_id.operands = (loop_id,) + tuple(loop_id.operands)  # loop ids refer to themselves
    back.set_metadata("llvm.loop", loop_id)
    builder.position_at_end(end)


def _vector_ptr(builder, base, index, vty):
    return builder.bitcast(builder.gep(base, [index]), vty.as_pointer())


@functools.lru_cache(maxsize=None)
def conv_block(p_, nv, w_):
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
    ``fastmath`` contraction; no other reordering of the sum over ``c``.
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

        def codegen(context, builder, signature, args):
            argtys = signature.args
            xa, wa, ta = (context.make_array(t)(context, builder, v) for t, v in zip(argtys[:3], args[:3]))
            oa, ba = (context.make_array(argtys[i])(context, builder, args[i]) for i in (13, 16))
            i64 = ir.IntType(64)
            ints = [context.cast(builder, args[i], argtys[i], types.int64) for i in (*range(3, 13), 14, 15, 17, 18)]
            xb_, wb_, rr, ss, xsr, xss, xsp, wsc, wst, cn, ob_, osp, kb0_, mode_ = ints
            fty = context.get_value_type(xf.dtype)
            vty = ir.VectorType(fty, w_)
            align = xf.dtype.bitwidth // 8
            zero = ir.Constant(vty, [ir.Constant(fty, 0.0)] * w_)
            accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nv)] for _ in range(p_)]
            undef = ir.Constant(vty, ir.Undefined)
            splat = ir.Constant(ir.VectorType(ir.IntType(32), w_), [ir.Constant(ir.IntType(32), 0)] * w_)
            xofs = [builder.mul(xsp, i64(p)) for p in range(p_)]
            with cgutils.for_range(builder, rr) as lr:
                with cgutils.for_range(builder, ss) as ls:
                    xo = builder.add(xb_, builder.add(builder.mul(lr.index, xsr), builder.mul(ls.index, xss)))
                    wo = builder.add(wb_, builder.mul(builder.add(builder.mul(lr.index, ss), ls.index), wst))
                    with _loop(builder, cn) as c:
                        wc = builder.add(wo, builder.mul(c, wsc))
                        xc = builder.add(xo, c)
                        wv = [builder.load(_vector_ptr(builder, wa.data, builder.add(wc, i64(v * w_)), vty),
                                           align=align) for v in range(nv)]
                        for p in range(p_):
                            xs = builder.load(builder.gep(xa.data, [builder.add(xc, xofs[p])]), align=align)
                            xv = builder.shuffle_vector(builder.insert_element(undef, xs, ir.Constant(ir.IntType(32), 0)),
                                                        undef, splat)
                            for v in range(nv):
                                builder.store(_fmuladd(builder, xv, wv[v], builder.load(accs[p][v])), accs[p][v])
            with builder.if_else(builder.icmp_signed("==", mode_, i64(0))) as (to_tmp, to_out):
                with to_tmp:
                    for p in range(p_):
                        for v in range(nv):
                            dst = _vector_ptr(builder, ta.data, i64((p * nv + v) * w_), vty)
                            builder.store(builder.load(accs[p][v]), dst, align=align)
                with to_out:
                    with_bias = builder.icmp_signed("==", mode_, i64(1))
                    for p in range(p_):
                        orow = builder.add(ob_, builder.mul(osp, i64(p)))
                        for v in range(nv):
                            dst = _vector_ptr(builder, oa.data, builder.add(orow, i64(v * w_)), vty)
                            bsrc = _vector_ptr(builder, ba.data, builder.add(kb0_, i64(v * w_)), vty)
                            addend = builder.load(builder.select(with_bias, bsrc, dst), align=align)
                            builder.store(builder.fadd(builder.load(accs[p][v]), addend), dst, align=align)
            return context.get_dummy_value()

        return sig, codegen

    block.__name__ = f"conv_block_{p_}x{nv}x{w_}"
    return block


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
