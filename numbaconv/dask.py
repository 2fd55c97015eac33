"""``numbaconv.dask.conv2d``: convolution of a ``dask.array`` chunked along batch, height and
width, on any dask scheduler (threads, processes, a ``distributed`` cluster).

How a graph is built (nothing is computed):

1. the arguments are validated as :func:`numbaconv.conv2d` validates them, on a zero-strided
   stand-in of ``x``'s shape (no memory), so errors come before any graph exists;
2. the channel axis is gathered into one chunk; the image's padding is applied once, at the
   whole image's border, with ``dask.array.pad`` (zeros, reflect, replicate = ``edge``,
   circular = ``wrap``): chunk borders never see padding;
3. output chunks follow the input's: output row ``o`` belongs to the chunk holding the first
   input row it reads (``o * stride``), so output chunk boundaries sit on the stride; the
   padded input is rechunked to start each chunk at that row, and each chunk borrows the
   ``dilation * (R - 1) + 1 - stride`` rows (and columns) after it from its neighbour
   (``dask.array.overlap``, trailing side only);
4. each block runs :func:`numbaconv.conv2d` with ``padding=0`` (and the fused epilogue), the
   weights and bias embedded in the graph once, as one key every task depends on.

Memory per task: one input block with its halo plus its output (see :func:`block_bytes`).
"""

import dask
import dask.array as da
import numpy as np

import numbaconv

from .problem import ConvProblem, check_activation

__all__ = ["conv2d", "block_bytes"]

_DASK_PAD_MODE = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


def _stand_in(shape, dtype):
    """An array of ``shape`` that occupies one element (every stride 0): what validation reads."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=shape, strides=(0,) * len(shape))


def _out_chunks(in_chunks, before, stride, ext, out_size):
    """Output chunk sizes along one axis, from the input's chunk sizes: output ``o`` goes to the
    chunk where padded input row ``o * stride`` lies (``before`` rows of padding precede the
    image); empty chunks are dropped, and a chunk that could not lend its predecessor the
    ``ext - stride`` halo rows is merged into it."""
    starts = np.cumsum((0,) + tuple(in_chunks))[1:-1] + before  # chunk starts, padded coordinates
    bounds = sorted({0, out_size} | {min(out_size, -(-int(s) // stride)) for s in starts})
    halo = max(ext - stride, 0)
    merged = []
    for n in (b - a for a, b in zip(bounds, bounds[1:]) if b > a):
        if merged and n * stride < halo:
            merged[-1] += n
        else:
            merged.append(n)
    return tuple(merged)


def _in_chunks(out_chunks, stride, padded_size):
    """Padded-input chunk sizes whose chunk ``k`` starts at output chunk ``k``'s first row."""
    sizes = [n * stride for n in out_chunks[:-1]]
    return tuple(sizes + [padded_size - sum(sizes)])


def _conv_block(xb, params, *residual, axes, extent, kwargs):
    """One output block: the block's input (halo included) cut to the rows and columns its
    outputs read, then ``numbaconv.conv2d`` without padding."""
    weight, bias = params
    index = [slice(None)] * 4
    for axis, ext, stride in zip(axes, extent, kwargs["stride"]):
        index[axis] = slice(0, (xb.shape[axis] - ext) // stride * stride + ext)
    return numbaconv.conv2d(xb[tuple(index)], weight, bias, padding=0, residual=residual[0] if residual else None,
                            **kwargs)


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
        self.pads = ((p.pad_top, p.pad_bottom), (p.pad_left, p.pad_right))
        self.halo = tuple(max(e - s, 0) for e, s in zip(self.extent, self.stride))
        self.out = tuple(_out_chunks(x.chunks[a], pad[0], s, e, n)
                         for a, pad, s, e, n in zip(self.axes, self.pads, self.stride, self.extent, (p.ho, p.wo)))
        self.padded = tuple(x.shape[a] + sum(pad) for a, pad in zip(self.axes, self.pads))
        self.inp = tuple(_in_chunks(o, s, n) for o, s, n in zip(self.out, self.stride, self.padded))

    def out_chunks(self, x):
        chunks = [None] * 4
        chunks[self.batch_axis], chunks[self.channel_axis] = x.chunks[self.batch_axis], (self.p.k,)
        chunks[self.axes[0]], chunks[self.axes[1]] = self.out
        return tuple(chunks)


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
    if any(p.padding):  # at the whole image's border, once
        widths = [(0, 0)] * 4
        widths[g.axes[0]], widths[g.axes[1]] = g.pads
        mode = _DASK_PAD_MODE[p.padding_mode]
        x = da.pad(x, widths, mode=mode, **({"constant_values": 0} if mode == "constant" else {}))
    chunks = list(x.chunks)
    chunks[g.axes[0]], chunks[g.axes[1]] = g.inp
    x = x.rechunk(tuple(chunks))
    if any(g.halo):
        depth = {a: 0 for a in range(4)}
        depth[g.axes[0]], depth[g.axes[1]] = (0, g.halo[0]), (0, g.halo[1])
        x = da.overlap.overlap(x, depth=depth, boundary="none")

    args = [x, dask.delayed((weight, bias), pure=True, traverse=False)]  # one key, every task's dependency
    if residual is not None:
        args.append(_residual_blocks(residual, p, g.out_chunks(x)))
    y = da.map_blocks(_conv_block, *args, dtype=x.dtype, chunks=g.out_chunks(x), name="numbaconv-conv2d",
                      meta=np.empty((0,) * 4, x.dtype),
                      axes=g.axes, extent=g.extent,
                      kwargs=dict(stride=g.stride, dilation=(p.dil_h, p.dil_w), groups=p.groups, layout=layout,
                                  weight_layout=p.weight_layout, algorithm=algorithm, activation=activation))
    return y[0] if unbatched else y


def _residual_blocks(residual, p, out_chunks):
    if isinstance(residual, np.ndarray):
        residual = da.from_array(residual, chunks=out_chunks)
    if not isinstance(residual, da.Array):
        raise TypeError(f"residual must be None, a dask array or a numpy.ndarray, got {type(residual).__name__}")
    if residual.dtype != p.dtype:
        raise TypeError(f"residual has dtype {residual.dtype} but the result has dtype {p.dtype}")
    if residual.shape != p.out_shape:
        raise ValueError(f"residual has shape {residual.shape} but the result has shape {p.out_shape}")
    return residual.rechunk(out_chunks)


def block_bytes(x, weight, bias=None, **conv2d_keywords):
    """Bytes one task of ``conv2d(x, weight, bias, **conv2d_keywords)`` holds at most: its input
    block with the halo, numbaconv's working copy of it (at most one more block: a padded or
    re-laid-out copy), its output block (and residual block), the weights.  A worker running
    ``t`` tasks at once needs about ``t`` times this above its baseline."""
    if x.ndim == 3:
        x = x[None]
    keys = ("stride", "padding", "dilation", "groups", "padding_mode", "layout", "weight_layout")
    g = _Geometry(x, weight, bias, **{k: conv2d_keywords.get(k, d) for k, d in
                                     zip(keys, (1, 0, 1, 1, "zeros", "NCHW", None))})
    rows = max(n + g.halo[0] for n in g.inp[0])
    cols = max(n + g.halo[1] for n in g.inp[1])
    batch, itemsize = max(x.chunks[g.batch_axis]), np.dtype(x.dtype).itemsize
    block_in = batch * g.p.c * rows * cols
    block_out = batch * g.p.k * max(g.out[0]) * max(g.out[1])
    extra_out = block_out if conv2d_keywords.get("residual") is not None else 0
    return (2 * block_in + block_out + extra_out) * itemsize + weight.nbytes
