"""The host (CPU) kernels: one module per algorithm, plus what they share.

* ``_jit``      -- the shared Numba settings (``jit`` / ``pjit``, ``FASTMATH``), small
  helpers callable from ``@njit`` (``valid_range``, BLAS ``gemm``);
* ``_vec``      -- explicit-vector register blocks (LLVM vector IR from ``@intrinsic``, ``prefetchw``) and the
  compile target's vector width; ``asm`` reads their machine code (the codegen tests);
  ``peak`` measures this machine's FMA peak (for ``numbaconv bench``);
* ``_launch``   -- the one shared parallel loop: a kernel's serial task function over ranges of
  independent jobs, on Numba's threads (one ``prange`` compiled per install, not one per kernel);
* ``naive``     -- the direct loop nest (the correctness baseline, a plain-Python twin beside it);
* ``im2col``    -- im2col + BLAS with a bounded workspace, and the public ``im2col`` / ``col2im``;
* ``tiled``     -- the cache- and register-blocked direct convolution (the fast path),
  ``_ukernels`` its generated micro-kernels and task functions (``python -m
  numbaconv.cpu.tiled``), ``_blocking`` their register-block sizes on the compile target and the 8 x 8
  register transposes between NCHW planes and channel vectors;
* ``dot``       -- tiled's path for deep NCHW layers (OIHW weights read in place);
* ``pointwise`` -- tiled's path for NCHW 1x1 layers (a GEMM on the input in place, tiled's
  register blocks with their roles swapped);
* ``depthwise`` -- depthwise and few-channel streaming kernels (the NHWC stride-1 register
  block: ``_vec.dw3x3_block``);
* ``winograd``  -- Winograd F(4x4 / 2x2, 3x3) for stride-1 3x3 layers (transforms:
  ``_vec.tile_transform``; GEMMs on tiled's register block);
* ``_wcache``   -- the cache of prepared weights (tiled's packed, winograd's transformed), and
  the plans' owned weights;
* ``epilogue``  -- the fused epilogue (activation, residual): the per-element arithmetic the
  kernels call on the blocks they finish, and the pass after kernels that do not;
* ``pool``      -- max pooling for the models ``numbaconv.torch.convert`` converts (not public API).

An algorithm module exposes ``run(problem, x, weight, bias, out)`` and ``WEIGHT_LAYOUTS``
(the protocol of :mod:`numbaconv.registry`, which names it); with ``FUSES_EPILOGUE = True``
its ``run`` also takes ``epi=`` (an :class:`~numbaconv.cpu.epilogue.Epilogue`), and its
``bind(problem, weight, bias, prepared=False)`` returns the call as a function of ``(x, out,
epi)`` (``prepared``: for a :class:`~numbaconv.Conv2dPlan`, which keeps what it prepares).

May import: each other, ``numbaconv.problem`` and ``numbaconv.layout`` (plain argument
types and parsing helpers, no kernels); never the front door (``api``, ``registry``,
``auto``), ``grad``, ``cuda``, ``bench`` or ``torch``.  ``_jit`` and ``_vec`` import nothing of
numbaconv; ``_launch`` only ``_jit``; ``_wcache`` only ``_jit`` and ``_launch``; ``_blocking``
only ``_jit`` and ``_vec``.
"""
