"""Per-machine tuning ("wisdom", as FFTW calls it): block sizes and ``auto``'s choices measured
on this CPU by ``numbaconv tune`` (:mod:`numbaconv.bench.tune`), read by the planners.

Two kinds of entries:

* **knobs** (:data:`KNOBS`): the register block, cache-blocking budgets and thresholds the
  kernels' planners use (``tiled``'s pixel block, input-channel block and row band, when NHWC
  reads HWIO weights in place, Winograd's blocks) and ``auto``'s threshold for Winograd.  Their defaults are what measured best on the CPUs this
  project has run on; a tuned value replaces the default on this machine only.
* **choices**: the algorithm ``auto`` runs for an exact problem geometry (dtype, layout,
  shapes, stride, padding, dilation, groups), where ``numbaconv tune`` measured another
  algorithm clearly faster than the heuristic's pick.  Other geometries keep the heuristic.

The file is readable JSON, stored beside Numba's cache (``$NUMBA_CACHE_DIR/numbaconv-wisdom``,
else ``~/.cache/numbaconv/wisdom``; ``$NUMBACONV_WISDOM_DIR`` overrides both) and keyed, in
its name and inside, by the LLVM target Numba compiles for -- the triple, CPU name and
feature string that also key Numba's cache.  A different CPU, or the same one compiled
for another target (``NUMBA_CPU_NAME``), never reads it; nor does another numbaconv
version.  ``NUMBACONV_WISDOM=0`` (or :func:`disable`) ignores it.
"""

import contextlib
import functools
import hashlib
import json
import os
import threading
import warnings
from typing import NamedTuple

__all__ = ["KNOBS", "Knob", "value", "choice", "problem_key", "wisdom_path", "wisdom", "load", "save", "forget",
           "override", "defaults_only", "disable", "enable", "generation", "target_key", "FORMAT"]

#: version of the file format (a file of another format is ignored)
FORMAT = 1


class Knob(NamedTuple):
    default: int
    candidates: tuple
    doc: str


#: tunable planner parameters: name -> (default, values ``numbaconv tune`` measures, meaning)
KNOBS = {
    "auto.winograd_min_channels": Knob(
        16, (8, 16, 32, 64),
        "auto runs a stride-1 3x3 layer with Winograd from this many input channels per group on (fewer: "
        "the GEMMs are too short to repay the transforms)"),
    "tiled.pixel_block": Knob(
        0, (0, 4, 6, 7, 8),
        "output pixels per micro-kernel call (the register block): 0 = the least padded work for the row's width; "
        "else this P where the target's micro-kernels have it (4 or 6 on AVX2 and SSE, 7 or 8 on AVX-512)"),
    "tiled.cb_bytes": Knob(
        128 << 10, (64 << 10, 128 << 10, 256 << 10, 512 << 10),
        "bytes of packed weights per input-channel block (R*S*cb*V values kept in L2 while a row band is swept)"),
    "tiled.band_bytes": Knob(
        512 << 10, (256 << 10, 512 << 10, 1 << 20, 2 << 20),
        "bytes of padded input rows per output-row band (one task's input working set)"),
    "tiled.task_weight_bytes": Knob(
        256 << 10, (0, 128 << 10, 256 << 10, 512 << 10),
        "NHWC: bytes of packed weights (of one input-channel block) of the output-channel blocks one task "
        "sweeps per input pixel block (0: one block per task)"),
    "tiled.hwio_inplace_bytes": Knob(
        1024, (256, 1024, 4096, 1 << 40),
        "NHWC reads HWIO weights in place (no packed copy) while K * itemsize is below this"),
    "winograd.cb_bytes": Knob(
        512 << 10, (256 << 10, 512 << 10, 1 << 20),
        "bytes of transformed input tiles per input-channel block (alpha^2 x T x cb)"),
    "winograd.m_bytes": Knob(
        512 << 10, (256 << 10, 512 << 10, 1 << 20),
        "bytes of GEMM results per task (alpha^2 x T x output channels), which sets the output channels per task"),
}

_lock = threading.Lock()
_state = {"loaded": False, "wisdom": None, "overrides": {}, "generation": 0,
          "enabled": os.environ.get("NUMBACONV_WISDOM", "1") not in ("0", "false", "False", "no", "off")}


def target_key():
    """``(triple, cpu name, features)`` of the target Numba compiles for."""
    from .cpu._vec import target_description
    return tuple(str(part) for part in target_description())


@functools.lru_cache(maxsize=None)
def intel_avx512():
    """Whether Numba compiles for an AVX-512 core other than AMD's (LLVM's CPU name not
    ``znver*``): where ``auto``'s defaults measured differently (see :mod:`numbaconv.auto`)."""
    from .cpu._vec import target_vector_bytes
    return target_vector_bytes() >= 64 and not target_key()[1].startswith("znver")


def _version():
    # (the package's own constant: importlib.metadata scans the installed distributions, 3 ms
    # of a process's first conv2d on Zen 1 after `import numbaconv`, 58 ms before it)
    from ._version import __version__
    return __version__


def wisdom_dir():
    if os.environ.get("NUMBACONV_WISDOM_DIR"):
        return os.environ["NUMBACONV_WISDOM_DIR"]
    from numba.core import config
    if config.CACHE_DIR:
        return os.path.join(config.CACHE_DIR, "numbaconv-wisdom")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "numbaconv", "wisdom")


def wisdom_path():
    """This machine's wisdom file (it may not exist)."""
    triple, cpu, features = target_key()
    digest = hashlib.sha1(f"{triple}|{cpu}|{features}|{_version()}".encode()).hexdigest()[:12]
    return os.path.join(wisdom_dir(), f"{cpu or 'generic'}-{digest}.json")


def _bump():
    _state["generation"] += 1


def generation():
    """Changes whenever a knob's value may have changed (planners key their caches on it)."""
    return _state["generation"]


def _read(path):
    """The wisdom in ``path`` if it was measured for this target and version, else ``None``."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warnings.warn(f"numbaconv: ignoring unreadable wisdom file {path!r}: {exc}", RuntimeWarning, stacklevel=3)
        return None
    triple, cpu, features = target_key()
    target = data.get("target", {}) if isinstance(data, dict) else {}
    if (data.get("format") != FORMAT or data.get("numbaconv") != _version()
            or (target.get("triple"), target.get("cpu"), target.get("features")) != (triple, cpu, features)):
        return None  # another CPU, target or version: never used
    knobs = {k: int(v) for k, v in data.get("knobs", {}).items() if k in KNOBS}
    choices = {str(k): str(v) for k, v in data.get("choices", {}).items()}
    return dict(data, knobs=knobs, choices=choices, _memo={})


def load(path=None):
    """(Re)read the wisdom file (``path``: another file, e.g. in tests); returns it or ``None``."""
    with _lock:
        _state["wisdom"] = _read(path or wisdom_path()) if _state["enabled"] else None
        _state["loaded"] = True
        _bump()
        return _state["wisdom"]


def wisdom():
    """The wisdom in use (``None``: defaults only)."""
    if not _state["loaded"]:
        load()
    return _state["wisdom"]


def disable():
    """Ignore any wisdom file from now on (defaults and the heuristic only)."""
    _state["enabled"] = False
    load()


def enable(path=None):
    """Read wisdom again (from ``path`` if given)."""
    _state["enabled"] = True
    return load(path)


def value(name):
    """The knob's value on this machine: an :func:`override`, else the tuned value, else the default."""
    overrides = _state["overrides"]
    if name in overrides:
        return overrides[name]
    w = wisdom()
    if w is not None and name in w["knobs"]:
        return w["knobs"][name]
    return KNOBS[name].default


@contextlib.contextmanager
def override(values):
    """Knob values for the duration of a ``with`` block (``numbaconv tune``'s sweeps, tests)."""
    unknown = set(values) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown tuning knob(s) {sorted(unknown)}; known: {sorted(KNOBS)}")
    saved = dict(_state["overrides"])
    _state["overrides"].update(values)
    _bump()
    try:
        yield
    finally:
        _state["overrides"] = saved
        _bump()


@contextlib.contextmanager
def defaults_only():
    """No wisdom for the duration of a ``with`` block (``numbaconv tune`` measures from the defaults)."""
    saved = (_state["loaded"], _state["wisdom"])
    _state["loaded"], _state["wisdom"] = True, None
    _bump()
    try:
        yield
    finally:
        _state["loaded"], _state["wisdom"] = saved
        _bump()


def problem_key(p, prepared=False):
    """A problem geometry as a string (JSON key): every field that shapes the computation, and
    ``[plan]`` for a :class:`numbaconv.Conv2dPlan`'s calls (``prepared``: its weights are
    prepared once, so no algorithm pays the weight caches' check, and the best choice can
    differ from ``conv2d``'s)."""
    return (f"{p.dtype.name} {p.layout}/{p.weight_layout} n{p.n} c{p.c} h{p.h} w{p.w} k{p.k} r{p.r} s{p.s} "
            f"stride{p.stride_h},{p.stride_w} pad{p.pad_top},{p.pad_bottom},{p.pad_left},{p.pad_right} "
            f"dil{p.dil_h},{p.dil_w} g{p.groups} {p.padding_mode}" + (" [plan]" if prepared else ""))


def choice(p, prepared=False):
    """The algorithm tuned for exactly ``p``'s geometry (through a plan: ``prepared``), or ``None``."""
    w = wisdom()
    if w is None or not w["choices"]:
        return None
    memo = w["_memo"]  # (formatting the key costs microseconds; conv2d asks on every call)
    if (p, prepared) not in memo:
        memo[p, prepared] = w["choices"].get(problem_key(p, prepared))
    return memo[p, prepared]


def save(knobs, choices, measurements=None, path=None):
    """Write wisdom for this target (atomically) and start using it; returns the path."""
    triple, cpu, features = target_key()
    data = dict(format=FORMAT, numbaconv=_version(), target=dict(triple=triple, cpu=cpu, features=features),
                knobs={k: int(v) for k, v in knobs.items()}, choices=dict(choices),
                measurements=measurements or {})
    path = path or wisdom_path()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    load(path)
    return path


def forget(path=None):
    """Delete this machine's wisdom file (defaults from now on); True if one was there."""
    path = path or wisdom_path()
    try:
        os.remove(path)
        existed = True
    except FileNotFoundError:
        existed = False
    load(path)
    return existed
