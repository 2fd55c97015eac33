"""Training: the backward passes of ``conv2d`` and ``conv_transpose2d``.

* ``backward``  -- ``conv2d_backward`` (grad input / weight / bias) on the CPU kernels, and
  the dispatch of device arrays to :mod:`numbaconv.cuda.backward`;
* ``depthwise`` -- depthwise layers' three gradients in one parallel pass;
* ``stream``    -- few-channel layers' (the seed notebook's) grad-weight and grad-bias;
* ``transpose`` -- ``conv_transpose2d``, the adjoint of ``conv2d`` (its grad-input).

May import: the core (``api`` for forward convolutions of the gradient, ``auto`` for the
algorithm they will run, ``problem``, ``layout``, ``padding``, ``registry``),
``numbaconv.cpu`` kernels and settings, and
``numbaconv.cuda.backward`` lazily (only for device arrays).  Never ``bench`` or ``torch``.
"""
