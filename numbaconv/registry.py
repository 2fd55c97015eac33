"""The table of convolution algorithms: name -> the module that implements it.

An algorithm is a module (named here, imported on first use) with::

    run(problem, x, weight, bias, out) -> None
    WEIGHT_LAYOUTS = (("NCHW", <weight layout>), ("NHWC", <weight layout>))

* ``problem`` -- a :class:`~numbaconv.problem.ConvProblem` with zero-only padding left
  to apply (other padding modes were materialised by the front door);
* ``x`` -- C-contiguous input in ``problem.layout``;
* ``weight`` -- C-contiguous weights in the layout ``WEIGHT_LAYOUTS`` names for that
  activation layout.  The front door converts at most once, and not at all when the
  caller's weights are already in that layout (NCHW + OIHW and NHWC + HWIO, the usual pairs);
* ``bias`` -- C-contiguous ``(K,)`` or ``None``;
* ``out`` -- C-contiguous result in ``problem.layout``, to be overwritten entirely.

Device algorithms (``host=False``, e.g. CUDA) take ``conv2d``'s raw arguments instead and
say with ``available`` whether they can run here.

This is the only place the front door (:mod:`numbaconv.api`) learns about kernels: it
names their modules as strings, so the core never imports a kernel package.  Tests and
benchmarks iterate over this one table, so a new algorithm is tested and benchmarked as
soon as it is registered here.
"""

import importlib
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Union

__all__ = ["Algorithm", "REGISTRY", "algorithms", "register", "usable"]

_DEFAULT_WEIGHT_LAYOUTS = (("NCHW", "OIHW"), ("NHWC", "OIHW"))


def _load(ref):
    """``"package.module"`` or ``"package.module:attribute"`` -> the object; others unchanged."""
    if not isinstance(ref, str):
        return ref
    module, _, attribute = ref.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, attribute) if attribute else obj


@dataclass(frozen=True)
class Algorithm:
    name: str
    #: the implementing module: a dotted name (imported on first use) or a module-like object
    module: Union[str, object]
    summary: str
    #: ``None`` (always usable) or a no-argument predicate, or its ``"module:function"`` name
    available: Union[str, Callable, None] = None
    host: bool = True  # False: takes the raw arguments itself (device arrays, e.g. CUDA)

    @cached_property
    def impl(self):
        return _load(self.module)

    @cached_property
    def run(self):
        return self.impl.run

    @cached_property
    def weight_layouts(self):
        """Activation layout -> the weight layout ``run`` takes."""
        return dict(getattr(self.impl, "WEIGHT_LAYOUTS", _DEFAULT_WEIGHT_LAYOUTS))

    def weight_layout(self, layout):
        """The weight layout ``run`` takes for activations in ``layout``."""
        return self.weight_layouts[layout]

    def is_available(self):
        return self.available is None or bool(_load(self.available)())


REGISTRY = {}


def register(algorithm):
    REGISTRY[algorithm.name] = algorithm
    return algorithm


def usable(name):
    """Whether algorithm ``name`` is registered and can run here (probes only that one)."""
    return name in REGISTRY and REGISTRY[name].is_available()


def algorithms():
    """Names of the algorithms usable on this machine, in registration order."""
    return tuple(name for name in REGISTRY if usable(name))


for _algorithm in (
    Algorithm("naive", "numbaconv.cpu.naive", "direct loop nest; the correctness baseline"),
    Algorithm("im2col", "numbaconv.cpu.im2col", "bounded-workspace im2col + BLAS GEMM"),
    Algorithm("tiled", "numbaconv.cpu.tiled", "cache- and register-blocked direct convolution (the fast path)"),
    Algorithm("winograd", "numbaconv.cpu.winograd", "Winograd F(4x4 / 2x2, 3x3) for stride-1 3x3 layers; other "
              "geometry runs tiled"),
    Algorithm("cuda", "numbaconv.cuda.conv", "@cuda.jit implicit GEMM / direct kernels (numbaconv[cuda]; GPU or simulator)",
              available="numbaconv.cuda.conv:available", host=False),
):
    register(_algorithm)
