#!/usr/bin/env python
"""Compile every ``numbaconv.cuda.conv`` kernel to PTX with the real CUDA target -- no GPU needed.

The CUDA simulator type-checks nothing, so this is what proves the kernels compile:
``python scripts/check_ptx.py [--cc 9.0] [--dump DIR]``.  Needs numba-cuda with NVVM and
NVRTC (``pip install -e '.[test]'`` brings them); ``NUMBA_ENABLE_CUDASIM`` must be unset.

Besides compiling, it checks what the PTX says about speed:
* float32 kernels contain no float64 arithmetic (an untyped ``0.0`` would promote it);
* no kernel touches local memory: every ``cuda.local.array`` (the implicit GEMM's register
  tile, its prefetch registers) is indexed by constants after unrolling, so it lives in
  registers.
"""

import argparse
import os
import re
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (default) or 8.0")
    parser.add_argument("--dump", help="write each kernel's PTX into this folder")
    args = parser.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        print("unset NUMBA_ENABLE_CUDASIM: the simulator cannot compile PTX", file=sys.stderr)
        return 2
    cc = tuple(int(v) for v in args.cc.split("."))

    from numbaconv.cuda import ptx as cuda_ptx

    failures = []
    start = time.perf_counter()
    for name, func, sig in cuda_ptx.ptx_targets():
        t0 = time.perf_counter()
        try:
            ptx = cuda_ptx.compile_ptx(func, sig, cc)
        except Exception as exc:  # noqa: BLE001 -- report every kernel, then fail
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{name}.ptx"), "w") as f:
                f.write(ptx)
        f64 = len(re.findall(r"\.f64", ptx))
        local = len(re.findall(r"(?:ld|st)\.local", ptx))
        fma = len(re.findall(r"fma\.rn\.f(?:32|64)", ptx))
        problems = []
        if "float32" in name and f64:
            problems.append(f"{f64} float64 instructions in a float32 kernel")
        if local:
            problems.append(f"{local} local-memory accesses: a cuda.local.array (register tile) spills")
        status = "ok  " if not problems else "FAIL"
        print(f"{status} {name:24s} {len(ptx):7d} chars  fma {fma:4d}  local {local:3d}  "
              f"{time.perf_counter() - t0:5.1f} s" + ("  " + "; ".join(problems) if problems else ""))
        failures += [f"{name}: {p}" for p in problems]
    if failures:
        print(f"{len(failures)} problem(s):\n  " + "\n  ".join(failures))
        return 1
    print(f"all kernels compiled for sm_{cc[0]}{cc[1]} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
