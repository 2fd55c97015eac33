"""Elementwise error of each algorithm against torch float64, relative to SPEC's scale
``conv(|x|, |w|)``: max and median of ``|y - y_exact| / conv(|x|, |w|)`` on a deep layer
(C = 512, 14x14, 32 outputs, float32), for standard-normal inputs and for inputs spanning
six decades.  The README's Winograd accuracy table.

    python scripts/winograd_accuracy.py
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

import numbaconv  # noqa: E402
from numbaconv.cpu import winograd  # noqa: E402
from numbaconv.problem import ConvProblem  # noqa: E402
from reference import torch_conv2d  # noqa: E402


def main():
    rng = np.random.default_rng(5)
    n, c, hw, k = 1, 512, 14, 32
    for label, decades in (("standard normal", False), ("six decades", True)):
        x = rng.standard_normal((n, c, hw, hw))
        w = rng.standard_normal((k, c, 3, 3))
        if decades:
            x *= 10.0 ** rng.uniform(-3, 3, x.shape)
            w *= 10.0 ** rng.uniform(-1, 1, w.shape)
        x, w = x.astype(np.float32), w.astype(np.float32)
        exact = torch_conv2d(x, w, None, padding=1)
        scale = torch_conv2d(np.abs(x), np.abs(w), None, padding=1)
        cells = []
        for name in ("tiled", "im2col", "F(2x2)", "F(4x4)"):
            if name.startswith("F"):
                p = ConvProblem.from_args(x, w, None, padding=1)
                out = np.empty(p.out_shape, np.float32)
                winograd.run(p, x, w, None, out, int(name[2]))
            else:
                out = numbaconv.conv2d(x, w, None, padding=1, algorithm=name)
            r = np.abs(out - exact) / scale
            cells.append(f"{name}: max {r.max():.1e} median {np.median(r):.1e}")
        print(f"{label}, C={c}: " + "  ".join(cells))


if __name__ == "__main__":
    main()
