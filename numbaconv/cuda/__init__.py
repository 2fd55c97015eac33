"""The GPU: ``@cuda.jit`` kernels, forward and backward side by side, with their host glue.

* ``conv``     -- forward kernels (implicit GEMM, direct), availability probes, device-array
  glue (numba, CuPy, torch CUDA tensors, DLPack); the ``"cuda"`` algorithm of the registry;
* ``backward`` -- grad-input / grad-weight / grad-bias kernels (uses ``conv``'s glue);
* ``ptx``      -- every kernel compiled to PTX without a GPU (``scripts/check_ptx.py``).

``numba.cuda`` is imported lazily, never at import time: ``import numbaconv`` works without
numba-cuda or a GPU.  Kernels call ``cuda.xxx`` through a module global bound on first use.

May import: ``numbaconv.problem`` and ``numbaconv.layout``, and each other in the order
``ptx -> backward -> conv``.  Never ``numbaconv.cpu``, ``grad``, the front door, ``bench`` or ``torch``.
"""
