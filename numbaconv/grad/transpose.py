"""``conv_transpose2d``: the transposed ("fractionally strided") convolution, as torch's.

A transposed convolution is the gradient w.r.t. the input of a forward convolution, so it
runs on the grad-input kernels of :mod:`numbaconv.grad.backward` (``cols = W^T @ x`` GEMM +
``col2im`` fold, or the direct depthwise kernels): ``conv_transpose2d(x, w)`` equals
``conv2d_backward_input(x, output_shape, w)`` for the forward convolution that maps a tensor
of the output's shape back to ``x``'s shape.

Weight convention: the weight *is that forward convolution's weight*, in the same
``weight_layout`` names as :func:`numbaconv.conv2d`, where ``O`` is the transposed
convolution's **input** channels and ``I`` its **output** channels per group:

* ``"OIHW"`` (default for ``layout="NCHW"``): ``(C_in, C_out/groups, R, S)`` -- exactly
  the weight of ``torch.nn.functional.conv_transpose2d`` / ``torch.nn.ConvTranspose2d``;
* ``"HWIO"`` (default for ``"NHWC"``): ``(R, S, C_out/groups, C_in)`` -- TensorFlow's
  ``conv2d_transpose`` filter ``[height, width, output_channels, in_channels]``;
* ``"OHWI"``: ``(C_in, R, S, C_out/groups)``, torch's weight in channels-last memory order.
"""

import numbers

import numpy as np

from .backward import _backward, _placeholder
from ..layout import to_layout
from ..problem import check_inputs, check_result_size, int_pair, unbatched

__all__ = ["conv_transpose2d"]


def conv_transpose2d(x, weight, bias=None, *, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                     layout="NCHW", weight_layout=None):
    """2-D transposed convolution with ``torch.nn.functional.conv_transpose2d``'s semantics.

    ``x`` is ``(N, C_in, H, W)`` (``layout="NCHW"``) or ``(N, H, W, C_in)`` (``"NHWC"``);
    ``weight`` is ``(C_in, C_out/groups, R, S)`` for the default ``weight_layout`` (see the
    module docstring for the other orders); ``bias`` is ``None`` or ``(C_out,)``.
    ``stride``, ``dilation``: int or pair >= 1; ``padding``: int or pair >= 0 (removed from
    both sides of the result); ``output_padding``: int or pair >= 0, added at the bottom /
    right, each smaller than the stride or the dilation on its axis (as torch).  The result
    has ``H_out = (H - 1) * stride - 2 * padding + dilation * (R - 1) + output_padding + 1``
    and is a new C-contiguous array in ``layout``.  A 3-D ``x`` is one unbatched image (the
    result is 3-D too, as in torch).
    """
    if unbatched(x):
        return conv_transpose2d(x[None], weight, bias, stride=stride, padding=padding, output_padding=output_padding,
                                groups=groups, dilation=dilation, layout=layout, weight_layout=weight_layout)[0]
    weight_layout = check_inputs(x, weight, bias, layout, weight_layout)
    if not isinstance(groups, numbers.Integral) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be an int >= 1, got {groups!r}")
    groups = int(groups)
    if isinstance(padding, str):
        raise ValueError(f"padding must be an int or a pair of ints for conv_transpose2d, got {padding!r}")
    sh, sw = int_pair("stride", stride, 1)
    dh, dw = int_pair("dilation", dilation, 1)
    ph, pw = int_pair("padding", padding, 0)
    oph, opw = int_pair("output_padding", output_padding, 0)
    for op, st, dil in ((oph, sh, dh), (opw, sw, dw)):
        if op >= st and op >= dil:
            raise ValueError(f"output_padding={output_padding!r} must be smaller than either stride={stride!r} "
                             f"or dilation={dilation!r} on each axis")

    dims = dict(zip(layout, x.shape))
    n, c_in, h, w = dims["N"], dims["C"], dims["H"], dims["W"]
    wdims = dict(zip(weight_layout, weight.shape))
    k, cg_out, r, s = wdims["O"], wdims["I"], wdims["H"], wdims["W"]
    if k != c_in:
        raise ValueError(f"weight shape {weight.shape} ({weight_layout}) has O={k} (the input channels of the "
                         f"transposed convolution), but x has C={c_in} channels")
    if c_in == 0 or cg_out == 0 or r == 0 or s == 0:
        raise ValueError(f"x shape {x.shape} ({layout}) and weight shape {weight.shape} ({weight_layout}) "
                         f"must have non-zero channels and kernel size")
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide the input channels C={c_in}")
    c_out = cg_out * groups
    if bias is not None and bias.shape != (c_out,):
        raise ValueError(f"bias must have shape ({c_out},) to match the {c_out} output channels, got {bias.shape}")
    h_out = (h - 1) * sh - 2 * ph + dh * (r - 1) + oph + 1
    w_out = (w - 1) * sw - 2 * pw + dw * (s - 1) + opw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"output size {(h_out, w_out)} of conv_transpose2d is not positive (input {(h, w)}, "
                         f"kernel {(r, s)}, stride {(sh, sw)}, padding {(ph, pw)}, dilation {(dh, dw)}, "
                         f"output_padding {(oph, opw)})")

    out_nchw = (n, c_out, h_out, w_out)
    out_shape = out_nchw if layout == "NCHW" else (n, h_out, w_out, c_out)
    check_result_size(out_shape, x.dtype, f"stride={stride!r}, dilation={dilation!r}, padding={padding!r}, "
                      f"output_padding={output_padding!r}")
    # The forward convolution out_shape -> x.  With output_padding >= stride (allowed when it
    # is < dilation) that convolution yields more rows than x has: they get zero gradient.
    ho = (h_out + 2 * ph - dh * (r - 1) - 1) // sh + 1
    wo = (w_out + 2 * pw - dw * (s - 1) - 1) // sw + 1
    if (ho, wo) != (h, w) and not np.isfinite(weight).all():  # K*C*R*S values: free
        # the zero rows appended below would meet the non-finite weights (0 * inf = NaN)
        # where torch multiplies nothing: gather products of real inputs only
        return _by_fold(x, weight, bias, layout, weight_layout, groups, (h_out, w_out), (ho, wo),
                        dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw)))
    dy = np.ascontiguousarray(x)
    if (ho, wo) != (h, w):
        full = np.zeros((n, c_in, ho, wo) if layout == "NCHW" else (n, ho, wo, c_in), dtype=x.dtype)
        if layout == "NCHW":
            full[:, :, :h, :w] = x
        else:
            full[:, :h, :w, :] = x
        dy = full
    geometry = dict(stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), groups=groups,
                    padding_mode="zeros", layout=layout, weight_layout=weight_layout)
    _, out, _ = _backward(dy, _placeholder(out_shape, x.dtype), weight, geometry, True, False)
    if bias is not None and out.size:
        if layout == "NCHW":
            out += bias.reshape(1, c_out, 1, 1)
        else:
            out += bias
    return out


def _by_fold(x, weight, bias, layout, weight_layout, groups, out_hw, blocks_hw, geometry):
    """The transposed convolution as torch's CPU kernel computes it: per group, the products
    ``W^T x`` of real inputs only (a GEMM), folded into the output by ``col2im``; the blocks
    that ``output_padding`` adds beyond the input are zero columns, not zero products."""
    from ..cpu.im2col import col2im
    xn = to_layout(x, layout, "NCHW")
    w = to_layout(weight, weight_layout, "OIHW")  # (C_in, C_out/groups, R, S)
    n, c_in, h, wd = xn.shape
    _, cog, r, s = w.shape
    cig = c_in // groups
    cols = np.zeros((n, groups * cog * r * s) + tuple(blocks_hw), dtype=x.dtype)
    for g in range(groups):
        wg = w[g * cig:(g + 1) * cig].reshape(cig, cog * r * s)
        with np.errstate(invalid="ignore", over="ignore"):  # NaN / Inf as torch: no warnings
            prod = np.matmul(wg.T, xn[:, g * cig:(g + 1) * cig].reshape(n, cig, h * wd))
        cols[:, g * cog * r * s:(g + 1) * cog * r * s, :h, :wd] = prod.reshape(n, cog * r * s, h, wd)
    out = col2im(cols.reshape(n, groups * cog * r * s, blocks_hw[0] * blocks_hw[1]), out_hw, (r, s), **geometry)
    if bias is not None:
        out += bias.reshape(1, -1, 1, 1)
    return to_layout(out, "NCHW", layout)
