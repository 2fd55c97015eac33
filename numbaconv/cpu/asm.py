"""Reading x86-64 assembly of numbaconv's kernels: the hot loop's FMAs and spills.

Used by the codegen tests (``tests/test_codegen.py``), which compile the kernels for named
CPU families in subprocesses (``NUMBA_CPU_NAME`` / ``NUMBA_CPU_FEATURES``) and assert the
register plan from the machine code: compiling for a CPU needs no such CPU.

``python -m numbaconv.cpu.asm`` prints the report for the target Numba compiles for.
"""

import json
import re

__all__ = ["hot_loop", "loop_stats", "report"]

_LABEL = re.compile(r"^(\.?L\w+|\w[\w.$]*):", re.M)
_FMA = re.compile(r"^\s*vfn?m(?:add|sub)\w*?(p[sd]|s[sd])\s+(.*)$", re.M)


def _blocks(asm):
    """``{label: text}`` for every labelled block of ``asm`` (text up to the next label)."""
    marks = [(m.group(1), m.start(), m.end()) for m in _LABEL.finditer(asm)]
    return {name: asm[end:(marks[i + 1][1] if i + 1 < len(marks) else len(asm))]
            for i, (name, _, end) in enumerate(marks)}


def hot_loop(asm):
    """The text of the loop with the most packed FMAs (then the most FMAs): a block that jumps
    back to its own label (LLVM's innermost loops are single blocks), or, failing that, the
    block with most FMAs."""
    blocks = _blocks(asm)
    loops = {}
    for name, text in blocks.items():
        back = re.search(rf"^\s*j\w+\s+{re.escape(name)}\s*$", text, re.M)
        if back:
            loops[name] = text[:back.end()]  # the loop body ends at its backward jump
    pool = loops or blocks
    def weight(text):
        fmas = _FMA.findall(text)
        return sum(1 for kind, _ in fmas if kind.startswith("p")), len(fmas)
    return max(pool.values(), key=weight, default="")


def loop_stats(asm):
    """FMAs of the hot loop by kind and register class, and its stack traffic.

    ``{"packed": {"zmm": n, "ymm": n, "xmm": n}, "scalar": n, "stack": n, "gpr_stack": n,
    "shuffles": n, "instructions": n}``: ``stack`` counts vector spills and reloads (stack slots
    read or written from vector registers), ``gpr_stack`` integer ones (e.g. a loop-invariant
    address reloaded when the 15 general registers run out); ``shuffles`` lane permutations and
    inserts (port 5 on Intel, which the second FMA unit shares), broadcasts from memory aside.
    """
    loop = hot_loop(asm)
    packed = {"zmm": 0, "ymm": 0, "xmm": 0}
    scalar = 0
    for kind, operands in _FMA.findall(loop):
        if kind.startswith("s"):
            scalar += 1
            continue
        for reg in packed:
            if f"%{reg}" in operands:
                packed[reg] += 1
                break
    lines = [ln for ln in loop.splitlines() if ln.strip() and not ln.strip().startswith((".", "#"))]
    # stack slots: addressed from %rsp, or at negative offsets from %rbp when it is the frame
    # pointer (set from %rsp in the prologue); LLVM otherwise uses %rbp as a plain register,
    # e.g. "(%rbp,%r10)" or, in an unrolled loop, "-24(%rbp)"
    frame = re.search(r"^\s*movq\s+%rsp,\s*%rbp\s*$", asm, re.M)
    slots = [ln for ln in lines if re.search(r"\(%rsp\b|-\d+\(%rbp\)" if frame else r"\(%rsp\b", ln)]
    vector = sum(1 for ln in slots if re.search(r"%[xyz]mm", ln))
    shuffle = re.compile(r"\s*v(?:perm|shuf|unpck|punpck|insert|pshufb|pblend|blend|movsh|movsl)"
                         r"|\s*vp?broadcast\w*\s+%")  # (a broadcast from a register is a shuffle)
    shuffles = sum(1 for ln in lines if shuffle.match(ln))
    return {"packed": packed, "scalar": scalar, "stack": vector, "gpr_stack": len(slots) - vector,
            "shuffles": shuffles, "instructions": len(lines)}


def report():
    """Codegen of the tiled micro-kernels (and pointwise's task, which inlines them), the dot
    block, the NHWC depthwise block, the NCHW phase planes' row-pair sweep, the streaming plane block, Winograd's stages and the epilogue's loops on the target
    Numba compiles for (JSON-able)."""
    import numpy as np

    from . import depthwise, dot, epilogue, pointwise, tiled, winograd
    from ._blocking import GEMM_P_CHOICES, GROUP_PACKS
    from ._vec import target_description, target_vector_bytes
    out = {"target": list(target_description()), "vector_bytes": target_vector_bytes(), "tiled": {},
           "dot": {}, "depthwise": {}, "winograd": {}, "pointwise": {}, "epilogue": {}}
    for dtype in (np.float32, np.float64):
        out["depthwise"][f"{np.dtype(dtype).name}/block4_s1"] = loop_stats(depthwise.microkernel_asm(dtype))
        out["depthwise"][f"{np.dtype(dtype).name}/sweep_pair_s1"] = loop_stats(depthwise.sweep_asm(dtype))
        out["depthwise"][f"{np.dtype(dtype).name}/plane8"] = loop_stats(depthwise.plane_asm(dtype))
        out["dot"][f"{np.dtype(dtype).name}/KB{dot.KB}/PB{dot.PB}"] = loop_stats(dot.microkernel_asm(dtype))
        for p_ in tiled.P_CHOICES[target_vector_bytes()]:
            stats = loop_stats(tiled.microkernel_asm(dtype, p_))
            out["tiled"][f"{np.dtype(dtype).name}/P{p_}/V{tiled.block_width(dtype)}/NV2"] = stats
        for p_ in tiled.NARROW_P_CHOICES.get(target_vector_bytes(), ()):  # (one register per pixel)
            stats = loop_stats(tiled.microkernel_asm(dtype, p_, 1))
            out["tiled"][f"{np.dtype(dtype).name}/P{p_}/V{tiled.block_width(dtype) // 2}/NV1"] = stats
        if dtype == np.float32:  # (one register shared by m groups: float32 only)
            for p_ in tiled.GROUP_PACK_P_CHOICES.get(target_vector_bytes(), ()):
                for m in GROUP_PACKS[target_vector_bytes()]:
                    stats = loop_stats(tiled.microkernel_asm(dtype, p_, 1, m))
                    out["tiled"][f"float32/P{p_}/V{tiled.block_width(dtype) // 2}/NV1/M{m}"] = stats
        if dtype == np.float32:  # (the same register block as tiled's, inlined into its task)
            p_ = max(GEMM_P_CHOICES[target_vector_bytes()])
            out["pointwise"][f"float32/P{p_}/V{tiled.block_width(dtype)}"] = loop_stats(pointwise.microkernel_asm(dtype))
        for part in ("gemm", "input", "output"):
            out["winograd"][f"{np.dtype(dtype).name}/{part}/P{winograd._P}"] = loop_stats(
                winograd.microkernel_asm(dtype, part))
    for dtype in (np.float32, np.float64):  # the fused epilogue's loops, per activation
        for act, code in epilogue.CODES.items():
            if code:
                text = epilogue.loop_asm(code, dtype)
                out["epilogue"][f"{np.dtype(dtype).name}/{act}"] = {
                    "maskmov": len(re.findall(r"^\s*vp?maskmov", text, re.M)),
                    "packed": {reg: len(re.findall(rf"^\s*v\w+p[sd]\s.*%{reg}", text, re.M))
                               for reg in ("zmm", "ymm", "xmm")}}
    return out


if __name__ == "__main__":
    print(json.dumps(report(), indent=1))
