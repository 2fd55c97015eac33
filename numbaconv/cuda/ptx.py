"""Every CUDA kernel compiled to PTX with the real CUDA target (no GPU needed).

The simulator runs kernels as Python and never types them; compiling to PTX catches the
typing errors it misses (``scripts/check_ptx.py``, ``tests/test_cuda.py``).
"""

from . import backward, conv

__all__ = ["ptx_targets", "compile_ptx", "compile_all_ptx"]


def ptx_targets():
    """``(name, python function, signature)`` of every forward and backward kernel."""
    return conv.ptx_targets() + backward.ptx_targets()


def compile_ptx(func, sig, cc=(9, 0)):
    """PTX of one kernel for compute capability ``cc`` (needs numba-cuda's NVVM, no GPU)."""
    cu = conv._import_cuda()
    if conv._sim_loaded():
        raise RuntimeError("PTX needs the real numba.cuda target; unset NUMBA_ENABLE_CUDASIM")
    return cu.compile_ptx(func, sig, cc=cc)[0]


def compile_all_ptx(cc=(9, 0)):
    """Every kernel compiled to PTX for ``cc``: name -> PTX."""
    return {name: compile_ptx(func, sig, cc) for name, func, sig in ptx_targets()}
