"""``im2col``: lower the convolution to matrix products, with a bounded workspace.

The full im2col matrix has ``C*R*S`` rows and ``N*Ho*Wo`` columns: for a 3x3 layer that
is 9x the input, and the classic memory blow-up.  Here the output is processed in chunks
of whole output rows, so the column buffer never exceeds :data:`WORKSPACE_BYTES`
(32 MiB by default; ``NUMBACONV_IM2COL_WORKSPACE_MB`` or :func:`set_workspace_bytes`
change it).  Each chunk: a parallel fill of the buffer, then one BLAS ``?gemm`` per group
that writes straight into the strided output (no transposes, no temporaries).

* NCHW: ``out[n, g] (Kg x L) = W_g (Kg x Cg*R*S) @ cols (Cg*R*S x L)``, one image at a time.
* NHWC: ``out (L x K) = cols (L x R*S*Cg) @ W_g (R*S*Cg x Kg)``; chunks run over the
  flattened ``N*Ho`` output rows, so small images are batched into one GEMM.

The public :func:`im2col` / :func:`col2im` are exactly ``torch.nn.functional.unfold`` /
``fold`` (NCHW).
"""

import os

import numba
import numpy as np
from numba import prange

from ..problem import check_array, check_padded_extent, check_result_size, int_pair
from ._jit import blas_threads_local, copy_run, fill_run, gemm, jit, pjit, valid_range
from ._launch import Task, type_key
from .epilogue import NONE, arg_key, finish_2d

__all__ = ["im2col", "col2im", "run", "set_workspace_bytes", "workspace_bytes"]

WORKSPACE_BYTES = int(float(os.environ.get("NUMBACONV_IM2COL_WORKSPACE_MB", 32)) * 2**20)


def set_workspace_bytes(nbytes):
    """Set the im2col column-buffer budget (bytes); returns the previous value."""
    global WORKSPACE_BYTES
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    previous, WORKSPACE_BYTES = WORKSPACE_BYTES, nbytes
    return previous


def workspace_bytes():
    return WORKSPACE_BYTES


# --- fill kernels ----------------------------------------------------------------------
# One row of the column matrix per call, so the same code fills serially (inside a
# thread's own tile, below) or in parallel (public im2col, backward pass).
@jit
def _fill_row_nchw(x, n, i0, i1, cols, row, sh, sw, pt, pl, dh, dw, r_, s_, wo_):
    """cols[row = (c, r, s), (i - i0) * wo_ + j] = x[n, c, i*sh + r*dh - pt, j*sw + s*dw - pl] (0 outside)."""
    h_, w_ = x.shape[2], x.shape[3]
    c = row // (r_ * s_)
    r = (row // s_) % r_
    s = row % s_
    off = s * dw - pl
    lo, hi_j = valid_range(off, sw, w_, wo_)
    base = row * (i1 - i0) * wo_
    xf = x.ravel()
    plane = (n * x.shape[1] + c) * h_
    zero = cols.dtype.type(0)
    # flat loops with unsigned indices: thousands of short rows per tile, so slice objects
    # (and Numba's wraparound selects on signed indices) would cost more than the copies
    for i in range(i0, i1):
        dst = np.uintp(base + (i - i0) * wo_)
        hi = i * sh + r * dh - pt
        if hi < 0 or hi >= h_:
            for j in range(wo_):
                cols[dst + np.uintp(j)] = zero
            continue
        for j in range(lo):
            cols[dst + np.uintp(j)] = zero
        src = np.uintp((plane + hi) * w_ + off)
        for j in range(lo, hi_j):
            cols[dst + np.uintp(j)] = xf[src + np.uintp(j * sw)]
        for j in range(hi_j, wo_):
            cols[dst + np.uintp(j)] = zero


@jit
def _fill_row_nhwc(x, t, t0, t1, g, cols, sh, sw, pt, pl, dh, dw, r_, s_, ho_, wo_, groups):
    """cols[g, (t - t0) * wo_ + j, (r, s, c)] = x[n, hi, wi, g*cg + c] for output row t = n*ho_ + i."""
    h_, w_, c_ = x.shape[1], x.shape[2], x.shape[3]
    xf = x.reshape(-1)
    cg = c_ // groups
    patch = r_ * s_ * cg
    n = t // ho_
    i = t % ho_
    for j in range(wo_):
        dst = g * (t1 - t0) * wo_ * patch + ((t - t0) * wo_ + j) * patch
        for r in range(r_):
            hi = i * sh + r * dh - pt
            for s in range(s_):
                wi = j * sw + s * dw - pl
                d = dst + (r * s_ + s) * cg
                # (not slice assignments: see numbaconv.cpu._jit.copy_run)
                if hi < 0 or hi >= h_ or wi < 0 or wi >= w_:
                    fill_run(cols, d, cg, cols.dtype.type(0))
                else:
                    copy_run(cols, d, xf, ((n * h_ + hi) * w_ + wi) * c_ + g * cg, cg)


@pjit
def _fill_nchw(x, n, i0, i1, cols, sh, sw, pt, pl, dh, dw, r_, s_, wo_):
    for row in prange(x.shape[1] * r_ * s_):
        _fill_row_nchw(x, n, i0, i1, cols, row, sh, sw, pt, pl, dh, dw, r_, s_, wo_)


@pjit
def _fill_nhwc(x, t0, t1, cols, sh, sw, pt, pl, dh, dw, r_, s_, ho_, wo_, groups):
    for job in prange((t1 - t0) * groups):
        _fill_row_nhwc(x, t0 + job // groups, t0, t1, job % groups, cols, sh, sw, pt, pl, dh, dw,
                       r_, s_, ho_, wo_, groups)


# --- the algorithm ----------------------------------------------------------------------
# One thread pool: each Numba thread takes whole tiles of output rows, fills its own slice
# of the workspace and multiplies it with BLAS restricted to the calling thread.  (Letting
# OpenBLAS spawn its own threads next to Numba's left two spinning pools fighting over the
# cores: calls were quantised to scheduler ticks, 8 ms for a 1 ms layer.)
@jit
def _conv_nchw_tasks(lo, hi, x, w, out, cols, tile_rows, nthreads, sh, sw, pt, pl, dh, dw, groups, bias, finish,
                     epi):
    n_, c_ = x.shape[0], x.shape[1]
    k_, cg, r_, s_ = w.shape
    ho_, wo_ = out.shape[2], out.shape[3]
    kg = k_ // groups
    patch = cg * r_ * s_
    wf = w.ravel()
    of = out.ravel()
    tiles = (ho_ + tile_rows - 1) // tile_rows
    per_thread = cols.size // nthreads
    for thread in range(lo, hi):
        buf = cols[thread * per_thread:(thread + 1) * per_thread]
        previous = blas_threads_local(1)
        for item in range(thread, n_ * tiles, nthreads):
            n = item // tiles
            i0 = (item % tiles) * tile_rows
            i1 = min(i0 + tile_rows, ho_)
            length = (i1 - i0) * wo_
            for row in range(c_ * r_ * s_):
                _fill_row_nchw(x, n, i0, i1, buf, row, sh, sw, pt, pl, dh, dw, r_, s_, wo_)
            for g in range(groups):
                gemm(False, False, length, kg, patch, buf, g * patch * length, length, wf, g * kg * patch, patch,
                        0.0, of, ((n * k_ + g * kg) * ho_ + i0) * wo_, ho_ * wo_)
            if finish:
                _finish_planes(of, bias, epi, (n * k_ * ho_ + i0) * wo_, k_, ho_ * wo_, length)
        blas_threads_local(previous)


_CONV_NCHW = Task(_conv_nchw_tasks)  # jobs: nthreads


@jit
def _conv_nhwc_tasks(lo, hi, x, w_hwio, out, cols, tile_rows, nthreads, sh, sw, pt, pl, dh, dw, groups, bias, finish,
                     epi):
    n_ = x.shape[0]
    r_, s_, cg, k_ = w_hwio.shape
    ho_, wo_ = out.shape[1], out.shape[2]
    kg = k_ // groups
    patch = r_ * s_ * cg
    wf = w_hwio.ravel()
    of = out.ravel()
    total = n_ * ho_
    tiles = (total + tile_rows - 1) // tile_rows
    per_thread = cols.size // nthreads
    for thread in range(lo, hi):
        buf = cols[thread * per_thread:(thread + 1) * per_thread]
        previous = blas_threads_local(1)
        for tile in range(thread, tiles, nthreads):
            t0 = tile * tile_rows
            t1 = min(t0 + tile_rows, total)
            length = (t1 - t0) * wo_
            for t in range(t0, t1):
                for g in range(groups):
                    _fill_row_nhwc(x, t, t0, t1, g, buf, sh, sw, pt, pl, dh, dw, r_, s_, ho_, wo_, groups)
            for g in range(groups):
                gemm(False, False, kg, length, patch, wf, g * kg, k_, buf, g * length * patch, patch,
                        0.0, of, t0 * wo_ * k_ + g * kg, k_)
            if finish:
                _finish_pixels(of, bias, epi, t0 * wo_, length, k_)
        blas_threads_local(previous)


_CONV_NHWC = Task(_conv_nhwc_tasks)  # jobs: nthreads


# 1x1, stride 1, no padding: the input already is the GEMM operand, no column buffer.  The bias
# and epilogue follow each thread's GEMMs in the same task (a separate parallel pass re-read the
# output from memory: 15-25 % of MobileNetV2's 1x1 layers' time on Zen 1); NCHW's pixels go
# through the GEMM ``chunk`` at a time, each chunk finished while still cached (NHWC measured
# fastest unchunked: OpenBLAS packs the weights again per call).
@jit
def _pointwise_nchw_tasks(lo, hi, x, w, out, nthreads, groups, bias, finish, epi, chunk):
    n_, c_ = x.shape[0], x.shape[1]
    k_ = w.shape[0]
    cg, kg = c_ // groups, k_ // groups
    hw = x.shape[2] * x.shape[3]
    xf = x.ravel()
    wf = w.ravel()
    of = out.ravel()
    span = (hw + nthreads - 1) // nthreads
    for thread in range(lo, hi):
        p0 = thread * span
        p1 = min(hw, p0 + span)
        if p1 > p0:
            previous = blas_threads_local(1)
            for n in range(n_):
                for c0 in range(p0, p1, chunk):
                    length = min(chunk, p1 - c0)
                    for g in range(groups):
                        gemm(False, False, length, kg, cg, xf, (n * c_ + g * cg) * hw + c0, hw, wf, g * kg * cg, cg,
                             0.0, of, (n * k_ + g * kg) * hw + c0, hw)
                    if finish:
                        _finish_planes(of, bias, epi, n * k_ * hw + c0, k_, hw, length)
            blas_threads_local(previous)


_POINTWISE_NCHW = Task(_pointwise_nchw_tasks)  # jobs: nthreads


@jit
def _pointwise_nhwc_tasks(lo, hi, x, w_hwio, out, nthreads, groups, bias, finish, epi, chunk):
    c_ = x.shape[3]
    k_ = w_hwio.shape[3]
    cg, kg = c_ // groups, k_ // groups
    pixels = x.shape[0] * x.shape[1] * x.shape[2]
    xf = x.ravel()
    wf = w_hwio.ravel()
    of = out.ravel()
    span = (pixels + nthreads - 1) // nthreads
    for thread in range(lo, hi):
        p0 = thread * span
        p1 = min(pixels, p0 + span)
        if p1 > p0:
            previous = blas_threads_local(1)
            for c0 in range(p0, p1, chunk):
                length = min(chunk, p1 - c0)
                for g in range(groups):
                    gemm(False, False, kg, length, cg, wf, g * kg, k_, xf, c0 * c_ + g * cg, c_, 0.0, of,
                         c0 * k_ + g * kg, k_)
                if finish:
                    _finish_pixels(of, bias, epi, c0, length, k_)
            blas_threads_local(previous)


_POINTWISE_NHWC = Task(_pointwise_nhwc_tasks)  # jobs: nthreads


@jit(inline="always")
def _finish_planes(of, bias, epi, base, k_, hw, length):
    """The bias, then the epilogue (``epi``: None, pruned; see ``epilogue.finish_2d``), on
    ``length`` pixels from ``base`` of each of the ``k_`` NCHW planes ``hw`` apart, right
    after the GEMMs wrote them (still cached)."""
    for k in range(k_):
        plane = of[base + k * hw:base + k * hw + length]
        b = bias[k]
        for i in range(length):
            plane[i] += b
    finish_2d(of, epi, base, k_, hw, length)


@jit(inline="always")
def _finish_pixels(of, bias, epi, p0, length, k_):
    """:func:`_finish_planes` for NHWC: pixels ``[p0, p0 + length)``, contiguous."""
    for pix in range(p0, p0 + length):
        row = of[pix * k_:(pix + 1) * k_]
        for i in range(k_):
            row[i] += bias[i]
    finish_2d(of, epi, p0 * k_, 1, 0, length * k_)


#: output bytes an NCHW pointwise chunk writes before it is finished: well inside L2 on every
#: core (Zen 1, MobileNetV2 / ResNet-50 1x1 layers: 32-128 KiB 5-30 % faster than unchunked)
CHUNK_BYTES = 128 * 2**10


#: NHWC 1x1 layers run one GEMM per thread (OpenBLAS packs the weights again per call: chunks
#: cost 0-40 % on layers with large weights), except where the weights are small and each
#: thread's output outgrows the caches many times: there chunks of this many output bytes,
#: each finished (bias, epilogue) while cached.  Zen 1, batch 8, im2col with ReLU / SiLU:
#: 16->96 @ 112 17.8 -> 12.0 / 23.7 -> 18.4 ms, 24->144 @ 56 7.3 -> 4.3 / 9.1 -> 6.9 ms;
#: 112->672 @ 14 3.7 -> 4.3-5.9 ms chunked (so not), batch 1 (2.4 MB a thread) 0-30 % slower
NHWC_CHUNK_BYTES = 256 * 2**10
NHWC_CHUNK_MAX_WEIGHT_BYTES = 32 * 2**10
NHWC_CHUNK_MIN_THREAD_BYTES = 4 * 2**20


#: a thread's column tile stays about L2-sized, so its GEMM reads it from cache
TILE_BYTES = 2 * 2**20


def _tile_rows(p, total_rows, nthreads):
    """Output rows per tile: each thread's slice of the workspace holds one tile, and the
    tile count is a multiple of the thread count with near-equal tiles (load balance:
    14 rows on 2 threads are 7 + 7, not 4 + 4 | 4 + 2)."""
    row_bytes = p.c * p.r * p.s * p.wo * p.dtype.itemsize
    fit = max(1, min(WORKSPACE_BYTES // nthreads, TILE_BYTES) // row_bytes)
    rounds = -(-(-(-total_rows // fit)) // nthreads)  # tiles per thread that fit the budget
    return int(max(1, -(-total_rows // (rounds * nthreads))))


WEIGHT_LAYOUTS = (("NCHW", "OIHW"), ("NHWC", "HWIO"))


#: ``run`` takes ``epi=``: the bias and epilogue follow each tile's (or chunk's) GEMMs
FUSES_EPILOGUE = True


def _finish_args(p, bias, epi, out):
    """``(bias, finish, epi)`` as the task functions take them."""
    finish = bias is not None or epi.active
    if bias is None:
        bias = np.zeros(p.k, dtype=p.dtype)
    return bias, finish, epi.kernel_arg(out.reshape(-1))


def run(p, x, w, bias, out, epi=NONE):
    """``w`` is OIHW for NCHW and HWIO for NHWC (see :data:`WEIGHT_LAYOUTS`); ``epi``: the
    epilogue, applied with the bias to each tile of the output as soon as it is computed."""
    bind(p, w, bias)(x, out, epi)


def bind(p, w, bias, prepared=False):
    """:func:`run` for ``p`` as a function of ``(x, out, epi)`` (``prepared``: the same either
    way).  The 1x1 paths bind what does not change per call (the bias array, the launch key of
    the weights): on the tiny layers that take them (squeeze-excitation 1x1 layers on 1x1
    images) the per-call Python work was most of the call."""
    if not (p.r == p.s == 1 and p.stride_h == p.stride_w == 1 and not p.has_padding):
        return lambda x, out, epi: _run_columns(p, x, w, bias, out, epi)
    has_bias = bias is not None
    b = bias if has_bias else np.zeros(p.k, dtype=p.dtype)
    # a task per thread, each a range of pixels: no more tasks than pixels (a 1x1 image is
    # one serial task, no parallel launch)
    pixels = p.ho * p.wo if p.layout == "NCHW" else p.n * p.ho * p.wo
    fixed = (type_key(w), type_key(b))
    task = _POINTWISE_NHWC if p.layout == "NHWC" else _POINTWISE_NCHW
    row_bytes = p.k * p.dtype.itemsize
    chunk = max(64, CHUNK_BYTES // row_bytes // 16 * 16)
    # NHWC: one GEMM per thread, unless the weights are small and the thread's output large
    # (see NHWC_CHUNK_BYTES)
    nhwc_chunk = pixels
    if p.c * p.k // p.groups * p.dtype.itemsize <= NHWC_CHUNK_MAX_WEIGHT_BYTES:
        nhwc_chunk = max(64, NHWC_CHUNK_BYTES // row_bytes)

    nhwc = p.layout == "NHWC"

    def launch(x, out, epi):
        # (a 1x1 image is one task whatever the thread count: get_num_threads costs 0.7 us)
        tasks = 1 if pixels == 1 else min(numba.get_num_threads(), pixels)
        ea = epi.kernel_arg(out.reshape(-1))
        finish = has_bias or epi.active
        key = (type_key(x), type_key(out), arg_key(ea), fixed)
        if nhwc:
            chunked = finish and pixels // tasks * row_bytes > NHWC_CHUNK_MIN_THREAD_BYTES
            task.run(key, tasks, x, w, out, tasks, p.groups, b, finish, ea, nhwc_chunk if chunked else pixels)
        else:
            task.run(key, tasks, x, w, out, tasks, p.groups, b, finish, ea, chunk if finish else pixels)
    return launch


def _run_columns(p, x, w, bias, out, epi):
    """Through column tiles (every geometry but the plain 1x1)."""
    nthreads = numba.get_num_threads()
    fin = _finish_args(p, bias, epi, out)
    geometry = (p.stride_h, p.stride_w, p.pad_top, p.pad_left, p.dil_h, p.dil_w, p.groups)
    rows = _tile_rows(p, p.ho if p.layout == "NCHW" else p.n * p.ho, nthreads)
    cols = np.empty(nthreads * rows * p.wo * p.c * p.r * p.s, dtype=p.dtype)
    if p.layout == "NCHW":
        _CONV_NCHW(nthreads, x, w, out, cols, rows, nthreads, *geometry, *fin)
    else:
        _CONV_NHWC(nthreads, x, w, out, cols, rows, nthreads, *geometry, *fin)


# --- public unfold / fold ----------------------------------------------------------------
def _unfold_geometry(kernel_size, stride, padding, dilation):
    r, s = int_pair("kernel_size", kernel_size, 1)
    sh, sw = int_pair("stride", stride, 1)
    ph, pw = int_pair("padding", padding, 0)
    dh, dw = int_pair("dilation", dilation, 1)
    return r, s, sh, sw, ph, pw, dh, dw


def _blocks(size, k, stride, pad, dil, name):
    check_padded_extent("padding", pad, (size + 2 * pad,))
    count = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
    if count < 1:
        raise ValueError(f"kernel_size {k} with dilation {dil} does not fit the padded {name} "
                         f"{size + 2 * pad}")
    return count


def im2col(x, kernel_size, *, stride=1, padding=0, dilation=1):
    """``(N, C, H, W) -> (N, C*R*S, L)`` patches, exactly ``torch.nn.functional.unfold``."""
    check_array("x", x, ndim=4)
    r, s, sh, sw, ph, pw, dh, dw = _unfold_geometry(kernel_size, stride, padding, dilation)
    n_, c_, h_, w_ = x.shape
    ho = _blocks(h_, r, sh, ph, dh, "height")
    wo = _blocks(w_, s, sw, pw, dw, "width")
    check_result_size((n_, c_ * r * s, ho * wo), x.dtype, f"kernel_size={kernel_size!r}, padding={padding!r}, "
                      f"stride={stride!r}, dilation={dilation!r}")
    out = np.empty((n_, c_ * r * s, ho * wo), dtype=x.dtype)
    if out.size:
        xc = np.ascontiguousarray(x)
        for n in range(n_):
            _fill_nchw(xc, n, 0, ho, out[n].reshape(-1), sh, sw, ph, pw, dh, dw, r, s, wo)
    return out


@pjit
def _fold(cols, out, r_, s_, sh, sw, ph, pw, dh, dw, ho_, wo_):
    n_, c_, h_, w_ = out.shape
    for job in prange(n_ * c_):
        n = job // c_
        c = job % c_
        out[n, c] = 0
        for r in range(r_):
            for s in range(s_):
                row = (c * r_ + r) * s_ + s
                off = s * dw - pw
                lo, hi_j = valid_range(off, sw, w_, wo_)
                for i in range(ho_):
                    hi = i * sh + r * dh - ph
                    if hi < 0 or hi >= h_:
                        continue
                    for j in range(lo, hi_j):
                        out[n, c, hi, j * sw + off] += cols[n, row, i * wo_ + j]


def col2im(cols, output_size, kernel_size, *, stride=1, padding=0, dilation=1):
    """``(N, C*R*S, L) -> (N, C, H, W)``, summing overlaps: exactly ``torch.nn.functional.fold``."""
    check_array("cols", cols, ndim=3)
    h_, w_ = int_pair("output_size", output_size, 1)
    r, s, sh, sw, ph, pw, dh, dw = _unfold_geometry(kernel_size, stride, padding, dilation)
    n_, rows, length = cols.shape
    if rows % (r * s):
        raise ValueError(f"cols has {rows} rows, not a multiple of kernel_size {r}x{s}={r * s}")
    ho = _blocks(h_, r, sh, ph, dh, "height")
    wo = _blocks(w_, s, sw, pw, dw, "width")
    if length != ho * wo:
        raise ValueError(f"cols has {length} blocks but output_size {(h_, w_)} with this geometry "
                         f"gives {ho}x{wo}={ho * wo}")
    check_result_size((n_, rows // (r * s), h_, w_), cols.dtype, f"output_size={output_size!r}")
    out = np.empty((n_, rows // (r * s), h_, w_), dtype=cols.dtype)
    if out.size:
        _fold(np.ascontiguousarray(cols), out, r, s, sh, sw, ph, pw, dh, dw, ho, wo)
    return out
