"""Drop-in ``torch.nn`` modules: :class:`Conv2d` and :class:`ConvTranspose2d`, torch's own
constructors, parameters, initialisation and ``state_dict`` (weights load either way), with
the convolution (forward and backward) run by the ``numbaconv::`` operators."""

import torch

from .functional import conv2d, conv_transpose2d, numbaconv_runs

__all__ = ["Conv2d", "ConvTranspose2d", "module_padding"]


def module_padding(conv):
    """A ``torch.nn.Conv2d``'s padding as numbaconv takes it: ``conv.padding``, or for the
    non-zero modes the padding torch materialises, ``(left, right, top, bottom)`` reversed."""
    if conv.padding_mode == "zeros":
        return conv.padding
    left, right, top, bottom = conv._reversed_padding_repeated_twice
    return (top, bottom), (left, right)


class Conv2d(torch.nn.Conv2d):
    """Drop-in :class:`torch.nn.Conv2d` whose convolution (forward and backward) is numbaconv's.

    Where the work runs:

    * CPU, float32/float64: ``numbaconv::conv2d`` and its backward, every ``padding`` form and
      ``padding_mode`` (the padding is handed to numbaconv, whose backward folds the gradient
      of reflect/replicate/circular padding back);
    * CUDA, when ``"cuda"`` is in :func:`numbaconv.algorithms`: numbaconv's CUDA forward and
      backward kernels;
    * anything else -- CUDA without numbaconv's CUDA algorithm, other devices, dtypes
      numbaconv does not support (float16, bfloat16): torch's own convolution, because
      numbaconv has no kernel for them; results are then exactly ``torch.nn.Conv2d``'s.
    """

    def _conv_forward(self, input, weight, bias):
        if not numbaconv_runs(input, weight):
            return super()._conv_forward(input, weight, bias)
        return conv2d(input, weight, bias, self.stride, module_padding(self), self.dilation, self.groups,
                      padding_mode=self.padding_mode)


class ConvTranspose2d(torch.nn.ConvTranspose2d):
    """Drop-in :class:`torch.nn.ConvTranspose2d` (``forward(input, output_size=None)``) whose
    transposed convolution is ``numbaconv::conv_transpose2d`` on CPU float32/float64 tensors,
    gradients for input, weight and bias included; other devices and dtypes run torch's."""

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros" or not numbaconv_runs(input, self.weight, transpose=True):
            return super().forward(input, output_size)  # (torch's error for the non-zero modes)
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding, output_padding,
                                self.groups, self.dilation)
