"""A converted (eval) torchvision model's first forward on a fresh install: an empty Numba
cache in this new process, then ``numbaconv.torch.convert`` and two forwards (the second
is the steady state).  The first forward compiles on both cores (numbaconv.ahead);
``NUMBACONV_COMPILE_AHEAD=0`` measures it on one.

    python scripts/first_forward.py mobilenet_v2 [cl]     # cl: channels_last
"""
import os
import sys
import tempfile
import time

os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp()  # (before numba is imported: an empty cache)

t0 = time.perf_counter()
import torch  # noqa: E402

import numbaconv.torch as nt  # noqa: E402
from numbaconv import ahead  # noqa: E402
from numbaconv.bench import models  # noqa: E402

torch.set_num_threads(2)
name = sys.argv[1] if len(sys.argv) > 1 else "resnet18"
fmt = torch.channels_last if len(sys.argv) > 2 and sys.argv[2] == "cl" else torch.contiguous_format
model = models.build(name).eval().to(memory_format=fmt)
x = torch.randn(1, 3, 224, 224).contiguous(memory_format=fmt)
converted = nt.convert(model)
t1 = time.perf_counter()
with torch.no_grad():
    converted(x)
t2 = time.perf_counter()
with torch.no_grad():
    converted(x)
t3 = time.perf_counter()
print(f"{name} ({'channels_last' if fmt is torch.channels_last else 'NCHW'}): import + build + convert {t1 - t0:.1f} s, "
      f"first forward {t2 - t1:.1f} s, second {1e3 * (t3 - t2):.0f} ms; "
      f"background compile processes: {ahead.stats()['started']}")
