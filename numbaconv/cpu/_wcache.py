"""Caches of weights prepared once for a kernel (``tiled``'s packed blocks, ``winograd``'s
transformed tiles), keyed by shape and checked bit for bit.

An entry keeps a private copy of the weights it was prepared from and is reused only when
the new weights are bit-for-bit equal to that copy (checked on every call, in parallel:
~0.2-0.4 ms for ResNet's largest, 9.4 MB, weights), so an array changed in place or a new
array with other values is always prepared afresh; entries are keyed by shape and a
sample of the values, so layers of the same shape keep one entry each.  Weights under ``min_bytes`` are
prepared every call (the check costs a fifth to a tenth of packing: 614 KB of 5x5 weights
pack in 108 us, check in 12 us; 147 KB: 21 vs 7 us).

Arrays marked with :func:`own` (a :class:`numbaconv.Conv2dPlan`'s private weights, which no
caller can reach) skip all of that: what is prepared from them is kept with them, for as
long as they live, and reused with no check.

An entry also knows whether its copy is finite (computed once).  A call that begins with
:func:`begin_call` can then ask :func:`verified_finite` about the weights it passed: when a
cache in this call compared exactly that memory with a finite copy, the front door skips its
scan for non-finite weights (``padding.padding_products``: 20-45 us of a 0.4-1 ms layer).
"""

import threading
import weakref

import numpy as np

from ._jit import jit
from ._launch import Task, type_key

__all__ = ["WeightCache", "own", "begin_call", "verified_finite"]

#: per thread: ``(data address, bytes, dtype)`` of the weights a cache compared bit for bit
#: with a finite copy during the current call (see :func:`begin_call`), or None
_VERIFIED = threading.local()


def begin_call():
    """Start of a convolution call on this thread: forget what earlier calls verified (their
    weights may have changed in place since)."""
    _VERIFIED.finite = None


def verified_finite(w):
    """Whether, since :func:`begin_call`, a cache compared the memory of ``w`` (same address,
    size and dtype) bit for bit with a copy that holds no Inf or NaN."""
    v = getattr(_VERIFIED, "finite", None)
    return v is not None and v == _memory(w)


def _verified(w, finite):
    _VERIFIED.finite = _memory(w) if finite else None


def _memory(w):
    return w.ctypes.data, w.nbytes, w.dtype.str

#: id of an owned array -> (weak reference to it, {(cache, key): prepared result})
_OWNED = {}


def own(a):
    """Mark ``a`` as never changing (only numbaconv holds it): caches keep what they prepare
    from it until ``a`` is freed, and reuse it without comparing the weights."""
    i = id(a)
    _OWNED[i] = (weakref.ref(a, lambda _, i=i: _OWNED.pop(i, None)), {})


@jit
def _xor_or(a, b):
    """``a != b`` anywhere (bit views).  Zero-based loop: no negative-index wraparound
    checks, so it vectorises (a ``range(lo, hi)`` loop ran ten times slower)."""
    d = a[0] ^ b[0]
    for i in range(a.size):
        d |= a[i] ^ b[i]
    return d != 0


@jit
def _differ_chunks(lo, hi, a, b, chunk, flags):
    for t in range(lo, hi):
        c0 = t * chunk
        c1 = min(a.size, c0 + chunk)
        flags[t] = _xor_or(a[c0:c1], b[c0:c1])


_DIFFER = Task(_differ_chunks)


#: weights up to this many elements are compared on the calling thread: waking the other
#: threads costs more than the comparison (Zen 1: ~30 us of a 2.3 KB check's ~40; Intel Xeon,
#: a 147 KB check between two conv2d calls: 28-36 us in one thread, 44-46 in parallel)
SERIAL_ELEMENTS = 1 << 18


def _memcmp():
    """libc's ``memcmp`` through ctypes, or None where there is none to load."""
    import ctypes
    try:
        fn = ctypes.CDLL(None).memcmp
    except (OSError, AttributeError, TypeError):  # pragma: no cover - platforms without a C library handle
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_MEMCMP = _memcmp()


def _bits_differ(a, b):
    """True when the C-contiguous unsigned-integer views ``a`` and ``b`` (same size >= 1)
    differ anywhere: small ones by libc's ``memcmp`` on the calling thread (147 KB in 6 us,
    1 MB in 50; nothing to compile: the compiled check cost a fresh install's second call
    0.2 s), large ones in up to 64 chunks in parallel."""
    n = a.size
    if n <= SERIAL_ELEMENTS:
        if _MEMCMP is None:  # pragma: no cover
            return not np.array_equal(a, b)
        return _MEMCMP(a.ctypes.data, b.ctypes.data, a.nbytes) != 0
    chunk = -(-n // min(n, 64))
    flags = np.zeros(-(-n // chunk), dtype=np.bool_)
    _DIFFER.run((type_key(a), type_key(b)), flags.size, a, b, chunk, flags)
    return bool(flags.any())


def _as_bits(a):
    return a.reshape(-1).view(np.uint32 if a.dtype.itemsize == 4 else np.uint64)


def _fingerprint(w):
    """Bits of up to 64 elements spread over ``w``: tells apart the weights of layers with
    the same shape (ResNet's stages repeat theirs), which a key of the shape alone would
    evict in turn on every call.  Only a key: the full bit check decides reuse."""
    flat = w.reshape(-1)
    return flat[::max(1, flat.size // 64)][:64].tobytes()


class WeightCache:
    """``get(key, w, build)``: ``build()``'s result for weights ``w`` (C-contiguous), reused
    while ``w`` is bit-for-bit what it was built from; least recently used entries go first
    once the kept copies and results exceed ``max_bytes``."""

    def __init__(self, min_bytes=64 << 10, max_bytes=256 << 20):
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes
        self.stats = {"hits": 0, "misses": 0}
        self._entries = {}
        self._lock = threading.Lock()

    def get(self, key, w, build):
        owned = _OWNED.get(id(w))
        if owned is not None and owned[0]() is w:
            store = owned[1]
            result = store.get((id(self), key))
            if result is None:  # two threads may both build it: the same result, kept once
                result = store.setdefault((id(self), key), build())
            return result
        key = (key, w.shape, w.dtype.str, _fingerprint(w))
        big = w.nbytes >= self.min_bytes
        if big:
            with self._lock:
                entry = self._entries.pop(key, None)
                if entry is not None:
                    self._entries[key] = entry  # most recently used last
            if entry is not None and not _bits_differ(_as_bits(w), _as_bits(entry[0])):
                self.stats["hits"] += 1
                _verified(w, entry[2])
                return entry[1]
        result = build()
        if big:
            self.stats["misses"] += 1
            copy = w.copy()
            entry = (copy, result, bool(np.isfinite(copy).all()))
            _verified(w, entry[2])
            with self._lock:
                self._entries.pop(key, None)
                self._entries[key] = entry
                total = sum(e[0].nbytes + e[1].nbytes for e in self._entries.values())
                while total > self.max_bytes and len(self._entries) > 1:
                    old = self._entries.pop(next(iter(self._entries)))
                    total -= old[0].nbytes + old[1].nbytes
        return result

    def clear(self):
        with self._lock:
            self._entries.clear()
