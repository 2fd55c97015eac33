"""A small ResNet-style CNN (torch, batch-norm folded into the convolutions) whose forward pass
matches torch when every convolution goes through numbaconv."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import numbaconv
from numbaconv.registry import REGISTRY

HOST_ALGORITHMS = [name for name in numbaconv.algorithms() if REGISTRY[name].host] + ["auto"]


class Block(nn.Module):
    def __init__(self, cin, cout, stride, groups=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


def make_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 5, 2, 2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        Block(8, 8, 1), Block(8, 16, 2), Block(16, 16, 1, groups=16),
    ).double()
    for m in net.modules():  # non-trivial batch-norm statistics to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


def fold(conv, bn):
    """Conv + BN (eval) as one conv: numpy OIHW weights and a bias."""
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    w = conv.weight.detach() * scale[:, None, None, None]
    b = (bn.bias - bn.running_mean * scale).detach()
    return w.numpy(), b.numpy()


def numbaconv_forward(net, x_nchw, algo, layout, dtype):
    x = np.ascontiguousarray(np.transpose(x_nchw, (0, 2, 3, 1)) if layout == "NHWC" else x_nchw).astype(dtype)

    def conv(inp, c, bn):
        w, b = fold(c, bn)
        return numbaconv.conv2d(inp, w.astype(dtype), b.astype(dtype), stride=c.stride, padding=c.padding,
                                groups=c.groups, layout=layout, weight_layout="OIHW", algorithm=algo)

    y = np.maximum(conv(x, net[0], net[1]), 0)
    for block in net[3:]:
        z = np.maximum(conv(y, block.conv1, block.bn1), 0)
        z = conv(z, block.conv2, block.bn2)
        y = np.maximum(z + (y if block.short is None else conv(y, block.short[0], block.short[1])), 0)
    return np.transpose(y, (0, 3, 1, 2)) if layout == "NHWC" else y


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("algo", HOST_ALGORITHMS)
def test_small_resnet_forward_matches_torch(algo, layout, dtype):
    net = make_net()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 30))
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    got = numbaconv_forward(net, x, algo, layout, dtype)
    assert got.shape == expected.shape == (2, 16, 8, 8)
    tol = 1e-3 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
