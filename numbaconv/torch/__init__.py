"""PyTorch bridge: numbaconv's convolutions as torch operators, modules and a model converter.

This package imports torch (``import numbaconv`` never does; only ``import numbaconv.torch``
does).  It offers:

* ``ops`` -- ``numbaconv::conv2d``, ``numbaconv::conv2d_backward`` and
  ``numbaconv::conv_transpose2d``, torch custom operators with fake implementations and
  registered autograd: ``torch.compile(fullgraph=True)`` and ``torch.export`` see one opaque
  operator per layer;
* ``functional`` -- :func:`conv2d`, :func:`conv_transpose2d`: torch's functional signatures in
  front of them (unbatched inputs, every padding form; ``conv2d`` also takes ``padding_mode``);
* ``modules`` -- :class:`Conv2d`, :class:`ConvTranspose2d`: drop-in subclasses of the
  ``torch.nn`` modules;
* ``convert`` -- :func:`convert`: a whole model on numbaconv: for inference, BatchNorm folded and the
  following residual add / activation fused into :class:`FusedConv2d` modules, each a
  :class:`numbaconv.Conv2dPlan` per memory format, consecutive ones grouped into
  :class:`ConvChain` modules that run their layers' launches in one step; for training, the
  plain module swap.

Tensors cross over without copies: a CPU tensor becomes a NumPy view, results come back with
``torch.from_numpy``.  A ``torch.channels_last`` tensor is handed over as its NHWC view
(``layout="NHWC"``; a channels-last weight as ``weight_layout="OHWI"``), and the result and
the gradients come back channels-last, as torch's own convolution does.

CUDA tensors: when ``"cuda"`` is in :func:`numbaconv.algorithms`, ``conv2d`` and its backward
run numbaconv's ``@cuda.jit`` kernels on the device tensors (no host copy).  Elsewhere --
CUDA without numbaconv's CUDA algorithm, CUDA transposed convolutions, dtypes numbaconv does
not support (float16, bfloat16) -- the modules run torch's own convolution, so a model keeps
working wherever it is moved; the functions raise numbaconv's ``TypeError`` for such dtypes
on the CPU.  Double backward (gradients of gradients) is not supported.

May import: the public ``numbaconv`` API, ``numbaconv.problem`` (argument parsing),
``numbaconv.cuda.backward`` (on a GPU only), ``numbaconv.cpu.pool`` (the max pooling of
converted models: not a public function) and its own modules.
"""

from . import ops
from .convert import ConvChain, FusedConv2d, MaxPool2d, convert
from .functional import conv2d, conv_transpose2d
from .modules import Conv2d, ConvTranspose2d

__all__ = ["conv2d", "conv_transpose2d", "convert", "ops", "Conv2d", "ConvChain", "ConvTranspose2d", "FusedConv2d",
           "MaxPool2d"]
