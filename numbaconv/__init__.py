"""numbaconv: fast 2-D convolution on NumPy arrays, compiled with Numba.

Public API (see SPEC.md): :func:`conv2d`, :func:`algorithms`, :func:`im2col`,
:func:`col2im`, :func:`convert_layout`.  ``import numbaconv`` never imports torch.
"""

from . import cuda_conv as _cuda_algo
from . import im2col as _im2col_algo
from . import naive as _naive_algo
from . import tiled as _tiled_algo
from .api import conv2d
from .backward import conv2d_backward, conv2d_backward_bias, conv2d_backward_input, conv2d_backward_weight
from .im2col import col2im, im2col
from .layout import convert_layout
from .registry import Algorithm, algorithms, register
from .transpose import conv_transpose2d

__version__ = "0.1.0"
__all__ = ["conv2d", "algorithms", "im2col", "col2im", "convert_layout", "__version__",
           "conv2d_backward", "conv2d_backward_input", "conv2d_backward_weight", "conv2d_backward_bias",
           "conv_transpose2d"]

register(Algorithm("naive", _naive_algo.run, "direct loop nest; the correctness baseline",
                   weight_layouts=_naive_algo.WEIGHT_LAYOUTS))
register(Algorithm("im2col", _im2col_algo.run, "bounded-workspace im2col + BLAS GEMM",
                   weight_layouts=_im2col_algo.WEIGHT_LAYOUTS))
register(Algorithm("tiled", _tiled_algo.run, "cache- and register-blocked direct convolution (the fast path)",
                   weight_layouts=_tiled_algo.WEIGHT_LAYOUTS))
register(Algorithm("cuda", _cuda_algo.run, "@cuda.jit implicit GEMM / direct kernels (numbaconv[cuda]; GPU or simulator)",
                   available=_cuda_algo.available, host=False))
