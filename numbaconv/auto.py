"""``algorithm="auto"``: pick the fastest algorithm from the problem's geometry.

The heuristic is a pure function of :class:`~numbaconv.problem.ConvProblem`, so tests can
check its choices without timing anything.  The rules and the measurements behind them
are in the README ("Which algorithm wins").
"""

from .registry import algorithms

__all__ = ["choose"]


def choose(p):
    """Name of the algorithm ``auto`` runs for problem ``p``."""
    names = algorithms()
    if "tiled" in names:
        return "tiled"
    # im2col pays a fill of C*R*S*Ho*Wo values per GEMM; it wins once each output pixel
    # reduces over enough inputs to amortise it.  Tiny reductions (depthwise, few channels)
    # are memory-bound, where the direct loop is better.
    if p.cg * p.r * p.s >= 16 and p.kg >= 8:
        return "im2col"
    return "naive"
