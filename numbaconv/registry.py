"""The table of convolution algorithms: name -> kernel entry point.

Every host algorithm has one entry point with the same signature::

    run(problem, x, weight_oihw, bias, out) -> None

* ``problem`` -- a :class:`~numbaconv.problem.ConvProblem` with zero-only padding left
  to apply (other padding modes were materialised by the front door);
* ``x`` -- C-contiguous input in ``problem.layout``;
* ``weight_oihw`` -- C-contiguous ``(K, C/groups, R, S)`` weights;
* ``bias`` -- C-contiguous ``(K,)`` or ``None``;
* ``out`` -- C-contiguous result in ``problem.layout``, to be overwritten entirely.

Tests and benchmarks iterate over this one table, so a new algorithm is tested and
benchmarked as soon as it is registered here.
"""

from dataclasses import dataclass
from typing import Callable

__all__ = ["Algorithm", "REGISTRY", "algorithms", "register"]


def _always():
    return True


@dataclass(frozen=True)
class Algorithm:
    name: str
    run: Callable
    summary: str
    available: Callable[[], bool] = _always
    host: bool = True  # False: takes the raw arguments itself (device arrays, e.g. CUDA)


REGISTRY = {}


def register(algorithm):
    REGISTRY[algorithm.name] = algorithm
    return algorithm


def algorithms():
    """Names of the algorithms usable on this machine, in registration order."""
    return tuple(name for name, algo in REGISTRY.items() if algo.available())
