"""The table of convolution algorithms: name -> kernel entry point.

Every host algorithm has one entry point with the same signature::

    run(problem, x, weight, bias, out) -> None

* ``problem`` -- a :class:`~numbaconv.problem.ConvProblem` with zero-only padding left
  to apply (other padding modes were materialised by the front door);
* ``x`` -- C-contiguous input in ``problem.layout``;
* ``weight`` -- C-contiguous weights in the layout the algorithm asked for with
  ``weight_layouts`` (per activation layout; OIHW ``(K, C/groups, R, S)`` by default).
  The front door converts at most once, and not at all when the caller's weights are
  already in that layout (NCHW + OIHW and NHWC + HWIO, the usual pairs, for ``naive``
  and ``im2col``);
* ``bias`` -- C-contiguous ``(K,)`` or ``None``;
* ``out`` -- C-contiguous result in ``problem.layout``, to be overwritten entirely.

Tests and benchmarks iterate over this one table, so a new algorithm is tested and
benchmarked as soon as it is registered here.
"""

from dataclasses import dataclass
from typing import Callable

__all__ = ["Algorithm", "REGISTRY", "algorithms", "register", "usable"]


def _always():
    return True


@dataclass(frozen=True)
class Algorithm:
    name: str
    run: Callable
    summary: str
    available: Callable[[], bool] = _always
    host: bool = True  # False: takes the raw arguments itself (device arrays, e.g. CUDA)
    weight_layouts: tuple = (("NCHW", "OIHW"), ("NHWC", "OIHW"))  # activation -> weight layout

    def weight_layout(self, layout):
        """The weight layout ``run`` takes for activations in ``layout``."""
        return dict(self.weight_layouts)[layout]


REGISTRY = {}


def register(algorithm):
    REGISTRY[algorithm.name] = algorithm
    return algorithm


def usable(name):
    """Whether algorithm ``name`` is registered and can run here (probes only that one)."""
    return name in REGISTRY and REGISTRY[name].available()


def algorithms():
    """Names of the algorithms usable on this machine, in registration order."""
    return tuple(name for name in REGISTRY if usable(name))
