"""One place that parses and validates ``conv2d``'s arguments.

:class:`ConvProblem` is the frozen geometry every kernel works from: plain ints, a layout
name and a dtype.  All user-facing ``TypeError`` / ``ValueError`` messages are raised
here, before any work, and each names the argument and quotes the bad value.
"""

import numbers
import os
from dataclasses import dataclass, replace
from functools import cached_property

import numpy as np

from .layout import ACTIVATION_LAYOUTS, DEFAULT_WEIGHT_LAYOUT, WEIGHT_LAYOUTS

__all__ = ["ACTIVATIONS", "ACTIVATION_CODES", "ConvProblem", "PADDING_MODES", "SUPPORTED_DTYPES", "check_activation", "check_array",
           "check_residual", "is_device_array"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


# --- device arrays (recognised without importing numba.cuda) ------------------------------
def _library(a):
    """``"torch"`` / ``"cupy"`` for tensors of those libraries, else ``None``."""
    module = type(a).__module__.split(".")[0]
    return module if module in ("torch", "cupy") else None


def _has_cai(a):
    try:  # torch raises RuntimeError (not AttributeError) for tensors that require grad
        return hasattr(a, "__cuda_array_interface__")
    except Exception:  # noqa: BLE001
        return _library(a) == "torch" and bool(getattr(a, "is_cuda", False))


def is_device_array(a):
    """True for GPU arrays (CAI, numba/simulator device arrays, CUDA DLPack); never raises."""
    return a is not None and not isinstance(a, np.ndarray) and (
        _has_cai(a) or getattr(a, "__cuda_ndarray__", False) or _is_dlpack_cuda(a))


def _is_dlpack_cuda(a):
    device = getattr(a, "__dlpack_device__", None)
    if device is None or _has_cai(a):
        return False
    try:
        return device()[0] in (2, 13)  # kDLCUDA, kDLCUDAManaged
    except Exception:  # noqa: BLE001
        return False


def check_array(name, a, ndim=None, allow_device=False):
    """``a`` must be a NumPy array of a supported float dtype (and ``ndim`` dimensions).

    ``allow_device``: also accept device arrays (``__cuda_array_interface__`` or numba's
    device arrays, simulator included), for the CUDA algorithm.
    """
    if not isinstance(a, np.ndarray) and not (allow_device and (
            hasattr(a, "__cuda_array_interface__") or getattr(a, "__cuda_ndarray__", False))):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {a.dtype}; numbaconv supports float32 and float64")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")


def check_inputs(x, weight, bias, layout, weight_layout, allow_device=False):
    """Arrays, dtypes, layouts and ranks shared by every convolution entry point.

    Returns ``weight_layout`` with ``None`` resolved to the layout's default.
    """
    check_array("x", x, allow_device=allow_device)
    check_array("weight", weight, allow_device=allow_device)
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x has dtype {x.dtype}; they must match")
    if bias is not None:
        check_array("bias", bias, allow_device=allow_device)
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x has dtype {x.dtype}; they must match")
    if layout not in ACTIVATION_LAYOUTS:
        raise ValueError(f"layout must be one of {ACTIVATION_LAYOUTS}, got {layout!r}")
    if weight_layout is None:
        weight_layout = DEFAULT_WEIGHT_LAYOUT[layout]
    if weight_layout not in WEIGHT_LAYOUTS:
        raise ValueError(f"weight_layout must be one of {WEIGHT_LAYOUTS} or None, got {weight_layout!r}")
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D ({layout}) or 3-D (one unbatched image), got shape {x.shape}")
    if weight.ndim != 4:
        raise ValueError(f"weight must be 4-D ({weight_layout}), got shape {weight.shape}")
    return weight_layout


def unbatched(x):
    """``x`` is one image without its batch axis (3-D), which torch's convolutions accept too."""
    return isinstance(x, np.ndarray) and x.ndim == 3


def call_unbatched(fn, x, out, *args, **kwargs):
    """``fn`` (a function of a 4-D ``x`` with an ``out=`` keyword) on the unbatched ``x`` as a
    batch of one; returns the result without the batch axis (``out`` itself when given: a
    3-D array of the result's shape, filled through a 4-D view)."""
    if out is None:
        return fn(x[None], *args, **kwargs)[0]
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be None or a numpy.ndarray, got {type(out).__name__}")
    if out.ndim != 3:
        raise ValueError(f"out must be 3-D for a 3-D (unbatched) x of shape {x.shape}, got shape {out.shape}")
    fn(x[None], *args, out=out[None], **kwargs)
    return out


def _is_int(v):
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


#: the largest stride, dilation, padding or padded extent accepted: the kernels index in
#: 64-bit integers, and sums of two such coordinates must not overflow
MAX_EXTENT = 2**61


def int_pair(name, value, minimum):
    """``value`` as ``(h, w)`` from an int or a pair of ints, each in ``[minimum, 2**61]``."""
    if type(value) is int and minimum <= value <= MAX_EXTENT:  # the common cases, without the ABC checks
        return value, value
    if (type(value) is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int
            and minimum <= min(value) and max(value) <= MAX_EXTENT):
        return value
    pair = (value, value) if _is_int(value) else value
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(_is_int(v) for v in pair)):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(pair) > MAX_EXTENT:
        raise ValueError(f"{name} must be at most 2**61 (the kernels index in 64-bit integers), got {value!r}")
    return int(pair[0]), int(pair[1])


def check_padded_extent(name, value, padded_hw):
    """The padded input must stay within :data:`MAX_EXTENT` too (``"same"`` derives its
    padding from the dilation)."""
    if max(padded_hw) > MAX_EXTENT:
        raise ValueError(f"{name}={value!r} makes the padded input {tuple(padded_hw)}, larger than 2**61 "
                         "(the kernels index in 64-bit integers)")


def _memory_bytes():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # no sysconf (Windows): numpy's own limit
        return 2**63 - 1


#: this machine's physical memory
MAX_RESULT_BYTES = _memory_bytes()


def available_memory():
    """Bytes of memory available now (Linux's MemAvailable), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return MAX_RESULT_BYTES


def check_result_size(shape, dtype, cause):
    """A result of ``shape`` must fit in the memory available now; ``cause`` names the
    arguments that made it (beyond it the allocation could only fail later -- in numpy, or
    by the kernel's out-of-memory killer -- without saying why).  Results under an eighth of
    the physical memory pass without a look at the current figure."""
    nbytes = np.dtype(dtype).itemsize
    for d in shape:
        nbytes *= d
    if nbytes <= MAX_RESULT_BYTES // 8:
        return
    limit = min(MAX_RESULT_BYTES, available_memory())
    if nbytes > limit:
        raise ValueError(f"the result would have shape {tuple(shape)} ({nbytes} bytes), more than the memory "
                         f"available on this machine ({limit} bytes); check {cause}")


def same_padding(size, kernel, stride, dilation):
    """``(before, after)`` that make the output ``ceil(size / stride)`` long (TF/JAX rule)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def parse_padding(value, kernel_hw, stride, dilation, in_hw):
    """Any accepted padding form as ``(top, bottom, left, right)``."""
    if isinstance(value, str):
        if value == "valid":
            return 0, 0, 0, 0
        if value == "same":
            top, bottom = same_padding(in_hw[0], kernel_hw[0], stride[0], dilation[0])
            left, right = same_padding(in_hw[1], kernel_hw[1], stride[1], dilation[1])
            return top, bottom, left, right
        raise ValueError(f"padding must be an int, a pair, a pair of pairs, 'valid' or 'same'; got {value!r}")
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (tuple, list)) for v in value):
        (top, bottom), (left, right) = [int_pair("padding", tuple(v), 0) for v in value]
        return top, bottom, left, right
    ph, pw = int_pair("padding", value, 0)
    return ph, ph, pw, pw


@dataclass(frozen=True)
class ConvProblem:
    """Geometry of one 2-D convolution, as the kernels see it.

    ``h`` and ``w`` are the spatial size of the input array handed to the kernel; the
    kernel applies ``pad_*`` zeros itself (never reading out of bounds).  Other padding
    modes are materialised by the front door, which then hands kernels a problem whose
    ``pad_*`` are zero (see :meth:`materialised`).
    """

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride_h: int = 1
    stride_w: int = 1
    pad_top: int = 0
    pad_bottom: int = 0
    pad_left: int = 0
    pad_right: int = 0
    dil_h: int = 1
    dil_w: int = 1
    groups: int = 1
    padding_mode: str = "zeros"
    layout: str = "NCHW"
    weight_layout: str = "OIHW"
    dtype: np.dtype = np.dtype(np.float32)

    # -- derived geometry -------------------------------------------------------------
    @property
    def ho(self):
        return (self.h + self.pad_top + self.pad_bottom - self.dil_h * (self.r - 1) - 1) // self.stride_h + 1

    @property
    def wo(self):
        return (self.w + self.pad_left + self.pad_right - self.dil_w * (self.s - 1) - 1) // self.stride_w + 1

    @property
    def cg(self):
        """Input channels per group."""
        return self.c // self.groups

    @property
    def kg(self):
        """Output channels per group."""
        return self.k // self.groups

    @property
    def is_depthwise(self):
        return self.groups == self.c and self.groups > 1

    @cached_property  # (read on every call of a plan)
    def out_shape(self):
        if self.layout == "NCHW":
            return (self.n, self.k, self.ho, self.wo)
        return (self.n, self.ho, self.wo, self.k)

    @property
    def in_shape(self):
        if self.layout == "NCHW":
            return (self.n, self.c, self.h, self.w)
        return (self.n, self.h, self.w, self.c)

    @property
    def flops(self):
        """Multiply-adds counted as two FLOPs: ``2 N K (C/groups) R S Ho Wo``."""
        return 2 * self.n * self.k * self.cg * self.r * self.s * self.ho * self.wo

    @property
    def padding(self):
        return self.pad_top, self.pad_bottom, self.pad_left, self.pad_right

    @property
    def has_padding(self):
        return any(self.padding)

    @cached_property
    def tap_reads(self):
        """``(rows, cols)``: ``rows[i, r]`` -- output row ``i`` reads real input (not zero
        padding) with kernel row ``r``; ``cols[j, s]`` the same for columns.  Output pixel
        ``(i, j)`` meets the padding with tap ``(r, s)`` unless ``rows[i, r] & cols[j, s]``."""
        def reads(size, taps, stride, dil, before, out):
            # one interval of outputs per tap (1 byte per output and tap, no index arrays:
            # outputs can number ~1e9 with extreme padding)
            m = np.zeros((out, taps), dtype=np.bool_)
            for t in range(taps):
                off = t * dil - before  # output o reads input o * stride + off
                lo = -(off // stride) if off < 0 else 0
                hi = min(out, (size - 1 - off) // stride + 1) if size - 1 - off >= 0 else 0
                m[lo:max(lo, hi), t] = True
            return m
        return (reads(self.h, self.r, self.stride_h, self.dil_h, self.pad_top, self.ho),
                reads(self.w, self.s, self.stride_w, self.dil_w, self.pad_left, self.wo))

    @cached_property
    def dead_taps(self):
        """``(R, S)`` bool: the taps that meet only zero padding, at every output pixel; and
        whether there is any (per problem: ``conv2d`` reuses its problems, and these numpy
        reductions cost ~15 us a call on small layers)."""
        rows, cols = self.tap_reads
        dead = ~rows.any(axis=0)[:, None] | ~cols.any(axis=0)[None, :]
        dead.flags.writeable = False
        return dead, bool(dead.any())

    @cached_property
    def compaction(self):
        """How to shrink a wasteful geometry, or ``None`` (see :class:`Compaction`)."""
        return Compaction.of(self)

    def materialised(self):
        """The problem after the front door padded the input by ``padding_mode`` (made once
        per problem: the memo of :meth:`from_args_cached` keeps it, and its compaction)."""
        return self._materialised

    @cached_property
    def _materialised(self):
        return replace(
            self,
            h=self.h + self.pad_top + self.pad_bottom,
            w=self.w + self.pad_left + self.pad_right,
            pad_top=0, pad_bottom=0, pad_left=0, pad_right=0,
            padding_mode="zeros",
        )

    # -- parsing ------------------------------------------------------------------------
    @classmethod
    def from_args(cls, x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
                  padding_mode="zeros", layout="NCHW", weight_layout=None, allow_device=False,
                  result_in_memory=True):
        """Validate ``conv2d``'s arguments (everything but ``out`` and ``algorithm``); the result
        must fit in memory unless ``result_in_memory`` is false (``numbaconv.dask``'s chunks)."""
        weight_layout = check_inputs(x, weight, bias, layout, weight_layout, allow_device)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        if not _is_int(groups) or groups < 1:
            raise ValueError(f"groups must be an int >= 1, got {groups!r}")
        groups = int(groups)

        dims = dict(zip(layout, x.shape))
        n, c, h, w = dims["N"], dims["C"], dims["H"], dims["W"]
        wdims = dict(zip(weight_layout, weight.shape))
        k, cg, r, s = wdims["O"], wdims["I"], wdims["H"], wdims["W"]
        if h == 0 or w == 0:
            raise ValueError(f"x shape {x.shape} ({layout}) has an empty spatial axis; only the batch may be "
                             "empty (as torch)")
        if c == 0 or k == 0 or r == 0 or s == 0:
            raise ValueError(f"x shape {x.shape} ({layout}) and weight shape {weight.shape} "
                             f"({weight_layout}) must have non-zero channels and kernel size")
        if c % groups or k % groups:
            raise ValueError(f"groups={groups} must divide both input channels C={c} and output channels K={k}")
        if cg * groups != c:
            raise ValueError(f"weight shape {weight.shape} ({weight_layout}) has I={cg} input channels per "
                             f"group, but x has C={c} channels and groups={groups} (expected I={c // groups})")
        if bias is not None and bias.shape != (k,):
            raise ValueError(f"bias must have shape ({k},) to match weight's {k} output channels, got {bias.shape}")

        sh, sw = int_pair("stride", stride, 1)
        dh, dw = int_pair("dilation", dilation, 1)
        top, bottom, left, right = parse_padding(padding, (r, s), (sh, sw), (dh, dw), (h, w))
        check_padded_extent("padding", padding, (h + top + bottom, w + left + right))
        if padding_mode == "reflect" and (max(top, bottom) >= h or max(left, right) >= w):
            raise ValueError(f"padding={padding!r} with padding_mode='reflect' must be smaller than the "
                             f"input's spatial size {(h, w)}")
        if padding_mode == "circular" and (max(top, bottom) > h or max(left, right) > w):
            raise ValueError(f"padding={padding!r} with padding_mode='circular' must not exceed the "
                             f"input's spatial size {(h, w)}")
        problem = cls(n=n, c=c, h=h, w=w, k=k, r=r, s=s, stride_h=sh, stride_w=sw,
                      pad_top=top, pad_bottom=bottom, pad_left=left, pad_right=right,
                      dil_h=dh, dil_w=dw, groups=groups, padding_mode=padding_mode,
                      layout=layout, weight_layout=weight_layout, dtype=x.dtype)
        eff_r, eff_s = dh * (r - 1) + 1, dw * (s - 1) + 1
        if eff_r > h + top + bottom or eff_s > w + left + right:
            raise ValueError(f"kernel of size {(r, s)} with dilation {(dh, dw)} spans {(eff_r, eff_s)}, larger "
                             f"than the padded input {(h + top + bottom, w + left + right)}")
        if result_in_memory:
            check_result_size(problem.out_shape, problem.dtype,
                              f"padding={padding!r}, stride={stride!r}, dilation={dilation!r}")
        return problem

    @classmethod
    def from_args_cached(cls, x, weight, bias=None, *, stride=1, padding=0, dilation=1, groups=1,
                         padding_mode="zeros", layout="NCHW", weight_layout=None):
        """:meth:`from_args` with a memo of the problems it accepted (parsing costs ~6 us a
        call, a tenth of a small depthwise layer's time).

        The key holds everything validation looks at -- the arrays' exact types, dtypes and
        shapes, and every other argument with the exact type of each number (so
        ``groups=True`` or ``stride=1.0`` never match ``1`` and still raise); a list or
        anything unhashable is parsed afresh.  Only accepted arguments are stored, so every
        error is still raised, every time.
        """
        args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=padding_mode, layout=layout, weight_layout=weight_layout)
        try:
            key = (type(x), x.dtype, x.shape, type(weight), weight.dtype, weight.shape,
                   None if bias is None else (type(bias), bias.dtype, bias.shape),
                   _typed(stride), _typed(padding), _typed(dilation), _typed(groups),
                   _typed(padding_mode), _typed(layout), _typed(weight_layout))
            problem = _ACCEPTED.get(key)
        except (AttributeError, TypeError):  # not arrays, or an unhashable argument
            return cls.from_args(x, weight, bias, **args)
        if problem is None:
            problem = cls.from_args(x, weight, bias, **args)
            if len(_ACCEPTED) >= _ACCEPTED_MAX:
                _ACCEPTED.clear()
            _ACCEPTED[key] = problem
        return problem

    def check_out(self, out, *inputs):
        """``out`` must be a C-contiguous array of the result's shape and dtype."""
        if out is None:
            return
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be None or a numpy.ndarray, got {type(out).__name__}")
        if out.dtype != self.dtype:
            raise TypeError(f"out has dtype {out.dtype} but the result has dtype {self.dtype}")
        if out.shape != self.out_shape:
            raise ValueError(f"out has shape {out.shape} but the result has shape {self.out_shape}")
        if not out.flags.c_contiguous:
            raise ValueError("out must be C-contiguous")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        for name, a in inputs:
            if a is not None and np.may_share_memory(out, a):
                raise ValueError(f"out must not share memory with {name} (inputs are never modified)")


#: ``activation=`` names (``numbaconv.cpu.epilogue`` holds the kernels; kept here so that
#: validation needs no kernel module)
ACTIVATIONS = ("relu", "relu6", "silu", "hardswish")
#: ``activation=`` name -> the code the CPU and CUDA kernels take (0: none)
ACTIVATION_CODES = {None: 0, **{name: i + 1 for i, name in enumerate(ACTIVATIONS)}}


def check_activation(activation):
    if activation is not None and (not isinstance(activation, str) or activation not in ACTIVATIONS):
        raise ValueError(f"activation must be None or one of {ACTIVATIONS}, got {activation!r}")


def check_residual(problem, residual, out):
    """``residual``: an array of the result's exact shape and dtype, any strides.  ``out`` may
    be the residual itself (an in-place residual update); any other overlap of ``out`` with it
    is a ValueError, as with every input.  Returns whether ``out`` is the residual."""
    if residual is None:
        return False
    if not isinstance(residual, np.ndarray):
        raise TypeError(f"residual must be None or a numpy.ndarray, got {type(residual).__name__}")
    if residual.dtype != problem.dtype:
        raise TypeError(f"residual has dtype {residual.dtype} but the result has dtype {problem.dtype}")
    if residual.shape != problem.out_shape:
        raise ValueError(f"residual has shape {residual.shape} but the result has shape {problem.out_shape}")
    if out is None or not np.may_share_memory(out, residual):
        return False
    same = (out.__array_interface__["data"][0] == residual.__array_interface__["data"][0]
            and out.strides == residual.strides)
    if not same:
        raise ValueError("out overlaps residual without being the same array (only out=residual, the "
                         "in-place update, may share memory)")
    return True  # (out was checked against every input already)


# --- the memo behind ConvProblem.from_args_cached -------------------------------------------
_ACCEPTED = {}
_ACCEPTED_MAX = 4096


def _typed(v):
    """``v`` with the type of every number in it: ``1``, ``1.0`` and ``True`` hash alike."""
    if type(v) is tuple:
        return tuple(map(_typed, v))
    return (type(v), v)


# --- compaction of wasteful geometry -----------------------------------------------------------
def _live_axis(size, taps, stride, dil, before, out):
    """``(o_lo, o_hi, t_lo, t_hi)`` along one axis: the taps that read real input for some
    output, and the outputs that have such a tap (everything else meets zero padding only)."""
    t_lo = t_hi = None
    o_lo, o_hi = out, 0
    for t in range(taps):
        off = t * dil - before  # output o reads input o * stride + off
        lo = max(0, -(off // stride)) if off < 0 else 0
        hi = min(out, (size - 1 - off) // stride + 1) if size - 1 - off >= 0 else 0
        if lo < hi:
            t_lo = t if t_lo is None else t_lo
            t_hi = t + 1
            o_lo, o_hi = min(o_lo, lo), max(o_hi, hi)
    if t_lo is None:  # no tap ever meets the image
        return 0, 0, 0, 0
    return o_lo, o_hi, t_lo, t_hi


@dataclass(frozen=True)
class AxisCompaction:
    """One axis of a :class:`Compaction`: compute outputs ``[out_lo, out_hi)`` with the taps
    ``[tap_lo, tap_hi)`` at ``stride`` / ``dilation`` on the input gathered at ``coords``
    (coordinates of the unpadded input; outside it the padding mode decides, zeros: 0).
    ``coords`` is ``None`` for an axis left as it is (its padding applied by the kernel)."""
    out_lo: int
    out_hi: int
    tap_lo: int
    tap_hi: int
    stride: int
    dilation: int
    coords: object  # np.ndarray of int64, or None


@dataclass(frozen=True)
class Compaction:
    """A geometry whose padded input is mostly what the kernel never needs: a stride far
    beyond the kernel's span, a dilation far beyond the image, taps that only ever meet
    zero padding, or outputs whose whole window is zero padding.

    Shrunk along each such axis: the dead taps are dropped, the dead outputs are left to the
    bias, and only the input coordinates the rest reads are gathered -- the padding
    materialised on the way (by the padding mode) -- at the kernel's span per output when
    the windows do not overlap, or tap by tap when even a window is mostly gaps.  Memory
    then scales with the image and the output, never with stride, dilation or padding.
    ``problem`` is the shrunk convolution (zero padding left only on untouched axes of a
    zero-padded problem); the front door gathers its input, slices the weights and writes
    its result into ``out[..., rows.out_lo:rows.out_hi, cols.out_lo:cols.out_hi]``.
    """
    problem: "ConvProblem"
    rows: AxisCompaction
    cols: AxisCompaction

    @classmethod
    def of(cls, p):
        zeros = p.padding_mode == "zeros"
        geo = ((p.h, p.r, p.stride_h, p.dil_h, p.pad_top, p.pad_bottom, p.ho),
               (p.w, p.s, p.stride_w, p.dil_w, p.pad_left, p.pad_right, p.wo))
        axes = [cls._axis(*g, zeros) for g in geo]
        if axes[0] is None and axes[1] is None:
            return None
        dims = []
        for i, (size, taps, stride, dil, before, after, out) in enumerate(geo):
            if axes[i] is not None:
                ax = axes[i]
            elif zeros:  # untouched: the kernel clips this axis' padding itself
                ax = axes[i] = AxisCompaction(0, out, 0, taps, stride, dil, None)
            else:  # untouched, but the padding mode is materialised with the other axis
                ax = axes[i] = AxisCompaction(0, out, 0, taps, stride, dil,
                                              np.arange(-before, size + after, dtype=np.int64))
            if ax.coords is None:
                dims.append((size, taps, stride, dil, before, after))
            else:
                dims.append((len(ax.coords), ax.tap_hi - ax.tap_lo, ax.stride, ax.dilation, 0, 0))
        (h, r, sh, dh, pt, pb), (w, s, sw, dw, pl, pr) = dims
        shrunk = replace(p, h=h, w=w, r=r, s=s, stride_h=sh, stride_w=sw, dil_h=dh, dil_w=dw, pad_top=pt,
                         pad_bottom=pb, pad_left=pl, pad_right=pr, padding_mode="zeros")
        return cls(shrunk, axes[0], axes[1])

    @staticmethod
    def _axis(size, taps, stride, dil, before, after, out, zeros):
        if zeros:
            o_lo, o_hi, t_lo, t_hi = _live_axis(size, taps, stride, dil, before, out)
            if o_hi <= o_lo:  # no tap ever meets the image: every output is the bias
                return AxisCompaction(0, 0, 0, 0, 1, 1, np.zeros(0, dtype=np.int64))
        else:  # every tap reads the image (through the padding mode)
            o_lo, o_hi, t_lo, t_hi = 0, out, 0, taps
        n_out, n_taps = o_hi - o_lo, t_hi - t_lo
        span = (n_taps - 1) * dil + 1
        padded = (n_out - 1) * stride + span  # the padded extent those outputs read
        # the cheapest input that serves them: as it is, a window per output, or taps only
        layouts = [(padded, "as is"), (n_out * n_taps, "taps")]
        if stride > span:
            layouts.append((n_out * span, "windows"))
        length, how = min(layouts)
        wasteful = length * 4 < padded and padded - length > 64
        if zeros:
            wasteful |= t_lo > 0 or t_hi < taps or out - n_out > max(16, out // 4)
        else:
            full = size + before + after
            wasteful |= full > 2 * padded + 64
        if stride > span and stride > 4:  # tiled's pixel blocks would run over the gaps
            wasteful = True
            if how == "as is":
                length, how = n_out * span, "windows"
        if not wasteful:
            return None
        start = o_lo * stride + t_lo * dil - before  # input coordinate of the first tap of the first output
        o = np.arange(n_out, dtype=np.int64)
        if how == "as is":
            coords, new_stride, new_dil = start + np.arange(padded, dtype=np.int64), stride, dil
        elif how == "windows":
            coords = (start + o[:, None] * stride + np.arange(span, dtype=np.int64)[None, :]).reshape(-1)
            new_stride, new_dil = span, dil
        else:
            coords = (start + o[:, None] * stride + np.arange(n_taps, dtype=np.int64)[None, :] * dil).reshape(-1)
            new_stride, new_dil = n_taps, 1
        return AxisCompaction(o_lo, o_hi, t_lo, t_hi, new_stride, new_dil, coords)
