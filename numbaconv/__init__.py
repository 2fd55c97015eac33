"""numbaconv: fast 2-D convolution on NumPy arrays, compiled with Numba.

Public API (see SPEC.md): :func:`conv2d` (with a fused ``activation`` / ``residual``
epilogue), :class:`Conv2dPlan` (a layer prepared once), :func:`algorithms`, :func:`im2col`,
:func:`col2im`, :func:`convert_layout`, the backward passes and :func:`conv_transpose2d`,
:func:`warmup` (compile ahead into Numba's cache) and :func:`clear_caches`.  ``import numbaconv`` never imports torch.

The package, top to bottom (``tests/test_architecture.py`` checks the import rules):

* the core, here: ``api`` (the front door: validate -> plan -> dispatch), ``plan``
  (``Conv2dPlan``: the same, with the validation and weight preparation done once), ``problem``
  (argument parsing and every error), ``layout``, ``padding``, ``registry`` (algorithm
  name -> implementing module), ``auto`` and ``cache`` (Numba's on-disk cache, ``warmup``);
* ``cpu/`` -- the host kernels, one module per algorithm, and the shared Numba settings;
* ``grad/`` -- the backward passes and ``conv_transpose2d``;
* ``cuda/`` -- the ``@cuda.jit`` kernels, forward and backward, with their host glue;
* ``bench/`` -- ``numbaconv bench``: the suite, the CLI, plots;
* ``torch`` -- the PyTorch integration (imports torch; nothing else here does).

The training functions load on first use (PEP 562), so ``import numbaconv`` stays cheap.
"""

import importlib
import sys

from ._version import __version__
from .api import conv2d
from .layout import convert_layout
from .plan import Conv2dPlan
from .registry import algorithms

__all__ = ["conv2d", "Conv2dPlan", "algorithms", "im2col", "col2im", "convert_layout", "__version__",
           "conv2d_backward", "conv2d_backward_input", "conv2d_backward_weight", "conv2d_backward_bias",
           "conv_transpose2d", "clear_caches", "warmup"]

#: public name -> the module that defines it, imported when the name is first used
_LAZY = {
    "im2col": "numbaconv.cpu.im2col",
    "col2im": "numbaconv.cpu.im2col",
    "conv2d_backward": "numbaconv.grad.backward",
    "conv2d_backward_input": "numbaconv.grad.backward",
    "conv2d_backward_weight": "numbaconv.grad.backward",
    "conv2d_backward_bias": "numbaconv.grad.backward",
    "conv_transpose2d": "numbaconv.grad.transpose",
    "warmup": "numbaconv.cache",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'numbaconv' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def clear_caches():
    """Free the memory numbaconv keeps between calls.

    That is: large weights converted to another layout, ``tiled``'s packed copies of large
    weights (and its NCHW 1x1 path's padded ones),
    ``winograd``'s transformed weights, the backward's reusable scratch
    buffers (of the calling thread), the memo of accepted ``conv2d`` arguments and
    ``auto``'s measured choices.  Numba's compiled kernels (on disk, ``NUMBA_CACHE_DIR``)
    are not touched.  Modules not yet imported hold nothing and are left unimported.
    """
    from . import api, auto, problem

    api._LAYOUTS.clear()
    problem._ACCEPTED.clear()
    auto.forget_measurements()
    for module, function in (("numbaconv.cpu.tiled", "clear_cache"), ("numbaconv.cpu.winograd", "clear_cache"),
                             ("numbaconv.grad.backward", "release_workspace")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            getattr(loaded, function)()
