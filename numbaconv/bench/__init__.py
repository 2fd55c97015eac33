"""``numbaconv bench``: the benchmark suite and its command line.

* ``suite`` -- SPEC.md's shape table, timing helpers shared with asv (``asv_bench/``) and the
  tests, torch (lazily imported) in the same process;
* ``cli``   -- the ``numbaconv`` console script (``python -m numbaconv``);
* ``plot``  -- the bar chart of ``--plot`` (matplotlib, lazily imported);
* ``models`` -- ``--models``: torchvision CNNs through ``numbaconv.torch.convert`` against torch
  eager and onnxruntime;
* ``tune``  -- ``numbaconv tune``: this machine's knobs and ``auto``'s choices, measured and
  stored as wisdom (:mod:`numbaconv.tuning`).

May import: the public ``numbaconv`` API and ``numbaconv.torch`` (``suite`` only through absolute imports: asv loads
that file on its own next to older commits), ``numbaconv.cuda.conv.real_gpu``, and the machine
probes ``numbaconv.cpu.peak`` / ``numbaconv.cpu._vec`` (the measured FMA peak, the LLVM target); ``tune`` also the core it
measures (``auto``, ``tuning``, ``problem``, ``registry``, ``cache``).  Nothing in the library
imports ``bench``.
"""
