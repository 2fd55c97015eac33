"""``numbaconv.dask.conv2d``: convolution of a ``dask.array`` chunked along batch, height and
width, on any dask scheduler (threads, processes, a ``distributed`` cluster).

How a graph is built (nothing is computed):

1. the arguments are validated as :func:`numbaconv.conv2d` validates them, on a zero-strided
   stand-in of ``x``'s shape (no memory), so errors come before any graph exists;
2. the channel axis is gathered into one chunk;
3. output chunks follow the input's: output row ``o`` belongs to the chunk holding image row
   ``o * stride``, so output chunk boundaries sit on the stride's grid (and stride 1 with
   ``"same"`` padding keeps the input's chunks);
4. one task per output block: it copies the rows and columns its outputs read (its input
   chunks, the halo from its neighbours) into one block, applies the image's padding where the
   block meets the image's border -- zeros by the kernel itself, reflect / replicate /
   circular by index maps over the whole image (a circular block reads the far side's
   chunks) -- and runs :func:`numbaconv.conv2d` on it, with the fused epilogue.  The weights
   and bias are one key of the graph that every task depends on.

One task per block, not dask's ``overlap`` + ``map_blocks``: overlap's slicing and
concatenation tasks cost more than the convolution itself (a 4096^2 image in 1024^2 chunks:
330 ms of overlap around 32 ms of kernels, measured).  Memory per task: see
:func:`block_bytes`.
"""

import threading

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

import numbaconv

from .problem import ConvProblem, check_activation, check_residual

__all__ = ["conv2d", "block_bytes"]


def _stand_in(shape, dtype):
    """An array of ``shape`` that occupies one element (every stride 0): what validation reads."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=shape, strides=(0,) * len(shape))


def _out_chunks(in_chunks, stride, out_size):
    """Output chunk sizes along one axis: output ``o`` goes to the input chunk holding image
    row ``o * stride`` (its window's origin, before padding shifts it), so with stride 1 and
    ``"same"`` padding the output is chunked exactly like the input (what ``to_zarr`` wants:
    regular chunks); empty chunks are dropped."""
    starts = np.cumsum((0,) + tuple(in_chunks))[1:-1]  # chunk starts, image coordinates
    bounds = sorted({0, out_size} | {min(out_size, -(-int(s) // stride)) for s in starts})
    return tuple(b - a for a, b in zip(bounds, bounds[1:]) if b > a)


def _source(i, size, mode):
    """Image index that padded index ``i`` (any int array) reads, torch's rules; -1: a zero."""
    if mode == "reflect":
        i = np.abs(i)
        return np.where(i >= size, 2 * (size - 1) - i, i)
    if mode == "replicate":
        return np.clip(i, 0, size - 1)
    if mode == "circular":
        return np.mod(i, size)
    return np.where((i >= 0) & (i < size), i, -1)


def _runs(lo, hi, size, mode, offsets):
    """How block rows ``lo .. hi - 1`` (image coordinates, may reach into the padding) are
    filled: ``(pad_before, pad_after, runs)`` -- zero padding is left to the kernel at the
    block's ends; every other row comes from a run ``(dst, chunk, src, length, step)`` of
    consecutive image rows (step +1, or -1 where reflect mirrors) inside one chunk."""
    if mode == "zeros":
        pad_before, pad_after = max(0, -lo), max(0, hi - size)
        src = np.arange(max(lo, 0), min(hi, size))
    else:
        pad_before = pad_after = 0
        src = _source(np.arange(lo, hi), size, mode)
    chunk = np.searchsorted(offsets, src, side="right") - 1
    runs, start = [], 0
    for k in range(1, len(src) + 1):
        if k < len(src) and chunk[k] == chunk[start] and (
                (k - start == 1 and abs(int(src[k]) - int(src[k - 1])) == 1)
                or (k - start > 1 and src[k] - src[k - 1] == src[start + 1] - src[start])):
            continue
        step = 1 if k - start == 1 else int(src[start + 1] - src[start])
        runs.append((start, int(chunk[start]), int(src[start] - offsets[chunk[start]]), k - start, step))
        start = k
    return pad_before, pad_after, runs


class _Block:
    """What one task does (a plain object: dask passes it as it is).  ``main`` is the input
    chunk the block reads most of (the task runs where it lives); ``halos`` the other chunks
    it reads, each as ``(chunk, first row, first column)`` of the slab that chunk exports."""

    def __init__(self, axes, shape, rows, cols, pads, main, halos, kwargs):
        self.axes, self.shape, self.rows, self.cols = axes, shape, rows, cols
        self.pads, self.main, self.halos, self.kwargs = pads, main, halos, kwargs


class _Params:
    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias


def _export(chunk, axes, slabs):
    """A chunk's halo slabs for the blocks that read it, copied: only these few rows and
    columns travel to the other workers, not the chunk."""
    ha, wa = axes
    out = {}
    for consumer, (r0, r1, c0, c1) in slabs.items():
        index = [slice(None)] * 4
        index[ha], index[wa] = slice(r0, r1), slice(c0, c1)
        out[consumer] = chunk[tuple(index)].copy()
    return out


_THREAD = threading.local()


def _scratch(shape, dtype):
    """The calling thread's block buffer, kept between tasks: a fresh one pays its first-touch
    page faults on every task (distributed's workers hand freed memory back to the system),
    measured 8-30 ms for 16 MiB on Zen 4 (KVM), as long as a 5x5 single-channel block's
    kernel.  One block per worker thread stays held (counted in :func:`block_bytes`)."""
    size = int(np.prod(shape))
    buf = getattr(_THREAD, "buf", None)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = _THREAD.buf = np.empty(size, dtype)
    return buf[:size].reshape(shape)


def _slice(start, length, step):
    stop = start + step * length
    return slice(start, stop if stop >= 0 else None, step)


def _run_block(block, params, residual, main, exports, consumer):
    """Assemble the block (its main chunk and the halo slabs its neighbours exported), then
    ``numbaconv.conv2d`` with the zero padding at the image's border left to the kernel."""
    ha, wa = block.axes
    got = {block.main: (main, 0, 0)}
    for (pair, r0, c0), exported in zip(block.halos, exports):
        got[pair] = (exported[consumer], r0, c0)
    buf = _scratch(block.shape, main.dtype)
    dst, src = [slice(None)] * 4, [slice(None)] * 4
    for rd, rc, rs, rn, rstep in block.rows:
        dst[ha] = slice(rd, rd + rn)
        for cd, cc, cs, cn, cstep in block.cols:
            a, r0, c0 = got[(rc, cc)]
            dst[wa] = slice(cd, cd + cn)
            src[ha], src[wa] = _slice(rs - r0, rn, rstep), _slice(cs - c0, cn, cstep)
            buf[tuple(dst)] = a[tuple(src)]
    return numbaconv.conv2d(buf, params.weight, params.bias, padding=block.pads, residual=residual, **block.kwargs)


def conv2d(x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1, padding_mode="zeros",
           layout="NCHW", weight_layout=None, algorithm="auto", activation=None, residual=None):
    """:func:`numbaconv.conv2d` of a ``dask.array.Array`` ``x``: a lazy ``dask.array.Array`` in
    ``layout``, chunked like ``x`` along batch, height and width (height and width chunks on the
    stride's grid), channels in one chunk.  Every :func:`numbaconv.conv2d` keyword but ``out``;
    ``x`` may be 3-D (one unbatched image); ``residual`` may be a dask or NumPy array of the
    result's shape.  Computed, it equals ``numbaconv.conv2d(x.compute(), weight, bias, ...)``
    within float rounding."""
    if not isinstance(x, da.Array):
        raise TypeError(f"x must be a dask.array.Array, got {type(x).__name__} (numbaconv.conv2d takes NumPy arrays)")
    unbatched = x.ndim == 3
    if unbatched:
        x = x[None]
        residual = residual[None] if residual is not None and residual.ndim == 3 else residual
    g = _Geometry(x, weight, bias, stride, padding, dilation, groups, padding_mode, layout, weight_layout)
    p = g.p
    check_activation(activation)
    if algorithm != "auto" and algorithm not in numbaconv.algorithms():
        raise ValueError(f"algorithm must be 'auto' or one of {numbaconv.algorithms()}, got {algorithm!r}")
    x = x.rechunk({g.channel_axis: -1})
    out_chunks = g.out_chunks(x)
    if residual is not None:
        residual = _residual_blocks(residual, p, out_chunks)

    name = "numbaconv-conv2d-" + tokenize(x, weight, bias, stride, padding, dilation, groups, padding_mode, layout,
                                          weight_layout, algorithm, activation, residual)
    wkey = (name + "-weights",)
    dsk = {wkey: _Params(weight, bias)}
    kwargs = dict(stride=g.stride, dilation=(p.dil_h, p.dil_w), groups=p.groups, padding_mode=p.padding_mode,
                  layout=layout, weight_layout=p.weight_layout, algorithm=algorithm, activation=activation)
    ha, wa = g.axes
    axis_plans = []
    for axis, out, before, s, e, size in zip(g.axes, g.out, (p.pad_top, p.pad_left), g.stride, g.extent, (p.h, p.w)):
        offsets = np.cumsum((0,) + x.chunks[axis])
        plans, o0 = [], 0
        for n in out:
            lo = o0 * s - before
            plans.append((n * s - s + e, _runs(lo, lo + (n - 1) * s + e, size, p.padding_mode, offsets)))
            o0 += n
        axis_plans.append(plans)
    batch_axis = g.batch_axis

    def chunk_key(bi, rc, cc):
        k = [0] * 4
        k[batch_axis], k[ha], k[wa] = bi, rc, cc
        return (x.name, *k)

    def span(runs, chunk):
        """Local rows (columns) ``[lo, hi)`` a block reads from ``chunk``, and how many."""
        idx = [v for _, c, s0, n, st in runs if c == chunk for v in (s0, s0 + st * (n - 1))]
        return min(idx), max(idx) + 1, sum(n for _, c, _, n, _ in runs if c == chunk)

    halo_name = name + "-halo"
    for bi, nb in enumerate(x.chunks[batch_axis]):
        exports = {}  # (rc, cc) -> {consumer: slab}
        blocks = []
        for i, (rows_len, (pt, pb, rows)) in enumerate(axis_plans[0]):
            for j, (cols_len, (pl, pr, cols)) in enumerate(axis_plans[1]):
                shape = [0] * 4
                shape[batch_axis], shape[g.channel_axis] = nb, p.c
                shape[ha], shape[wa] = rows_len - pt - pb, cols_len - pl - pr
                row_chunks, col_chunks = sorted({r[1] for r in rows}), sorted({c[1] for c in cols})
                main = max(((rc, cc) for rc in row_chunks for cc in col_chunks),
                           key=lambda pc: span(rows, pc[0])[2] * span(cols, pc[1])[2])
                halos = []
                for rc in row_chunks:
                    for cc in col_chunks:
                        if (rc, cc) == main:
                            continue
                        (r0, r1, _), (c0, c1, _) = span(rows, rc), span(cols, cc)
                        exports.setdefault((rc, cc), {})[(i, j)] = (r0, r1, c0, c1)
                        halos.append(((rc, cc), r0, c0))
                block = _Block((ha, wa), tuple(shape), rows, cols, ((pt, pb), (pl, pr)), main, halos, kwargs)
                blocks.append((i, j, block))
        for (rc, cc), slabs in exports.items():
            dsk[(halo_name, bi, rc, cc)] = (_export, chunk_key(bi, rc, cc), (ha, wa), slabs)
        for i, j, block in blocks:
            index = [0] * 4
            index[batch_axis], index[ha], index[wa] = bi, i, j
            rkey = None if residual is None else (residual.name, *index)
            dsk[(name, *index)] = (_run_block, block, wkey, rkey, chunk_key(bi, *block.main),
                                   [(halo_name, bi, *pair) for pair, _, _ in block.halos], (i, j))
    deps = [x] if residual is None else [x, residual]
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    y = da.Array(graph, name, chunks=out_chunks, dtype=x.dtype, meta=np.empty((0,) * 4, x.dtype))
    return y[0] if unbatched else y


class _Geometry:
    """What :func:`conv2d` decides before building a graph (shared with :func:`block_bytes`)."""

    def __init__(self, x, weight, bias, stride, padding, dilation, groups, padding_mode, layout, weight_layout):
        self.p = p = ConvProblem.from_args(_stand_in(x.shape, x.dtype), weight, bias, stride=stride, padding=padding,
                                           dilation=dilation, groups=groups, padding_mode=padding_mode,
                                           layout=layout, weight_layout=weight_layout, result_in_memory=False)
        self.axes = (layout.index("H"), layout.index("W"))
        self.channel_axis, self.batch_axis = layout.index("C"), layout.index("N")
        self.extent = (p.dil_h * (p.r - 1) + 1, p.dil_w * (p.s - 1) + 1)
        self.stride = (p.stride_h, p.stride_w)
        self.out = tuple(_out_chunks(x.chunks[a], s, n) for a, s, n in zip(self.axes, self.stride, (p.ho, p.wo)))

    def out_chunks(self, x):
        chunks = [None] * 4
        chunks[self.batch_axis], chunks[self.channel_axis] = x.chunks[self.batch_axis], (self.p.k,)
        chunks[self.axes[0]], chunks[self.axes[1]] = self.out
        return tuple(chunks)


def _residual_blocks(residual, p, out_chunks):
    if isinstance(residual, np.ndarray):
        residual = da.from_array(residual, chunks=out_chunks)
    if not isinstance(residual, da.Array):
        raise TypeError(f"residual must be None, a dask array or a numpy.ndarray, got {type(residual).__name__}")
    check_residual(p, _stand_in(residual.shape, residual.dtype), None)  # conv2d's dtype and shape errors
    return residual.rechunk(out_chunks)


def block_bytes(x, weight, bias=None, **conv2d_keywords):
    """Bytes one task of ``conv2d(x, weight, bias, **conv2d_keywords)`` holds at most: the input
    chunks it reads (at most its block and the halo's neighbours), the block it assembles,
    numbaconv's working copy of it (a padded or re-laid-out copy, at most one more block), its
    output block (and residual block), the weights.  A worker running ``t`` tasks at once needs
    about ``t`` times this above its baseline, plus the chunks it holds for other tasks."""
    if x.ndim == 3:
        x = x[None]
    keys = ("stride", "padding", "dilation", "groups", "padding_mode", "layout", "weight_layout")
    g = _Geometry(x, weight, bias, **{k: conv2d_keywords.get(k, d) for k, d in
                                     zip(keys, (1, 0, 1, 1, "zeros", "NCHW", None))})
    batch, itemsize = max(x.chunks[g.batch_axis]), np.dtype(x.dtype).itemsize
    rows = max((n - 1) * g.stride[0] + g.extent[0] for n in g.out[0])
    cols = max((n - 1) * g.stride[1] + g.extent[1] for n in g.out[1])
    chunks_read = batch * g.p.c * (rows + max(x.chunks[g.axes[0]])) * (cols + max(x.chunks[g.axes[1]]))
    block_in = batch * g.p.c * rows * cols
    block_out = batch * g.p.k * max(g.out[0]) * max(g.out[1])
    extra_out = block_out if conv2d_keywords.get("residual") is not None else 0
    return (chunks_read + 2 * block_in + block_out + extra_out) * itemsize + weight.nbytes
