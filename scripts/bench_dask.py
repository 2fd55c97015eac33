"""numbaconv.dask on a LocalCluster of worker processes: throughput (MPixel/s of output) with
1 and 2 workers, against dask-image's ``ndfilters.convolve`` (SciPy per chunk) on the same
single-channel image; each worker's peak memory (zarr -> zarr, on freshly restarted workers:
its peak RSS above its RSS before the job) against the per-task bound
``numbaconv.dask.block_bytes``.

Two measurements: "in memory" -- the image persisted on the workers, the result persisted
(the convolution and the framework, what the library controls); "zarr -> zarr" -- read from
a zarr store on disk, written to another (what a pipeline sees; zarr's default compression
included).  Each worker runs one task at a time and one Numba thread (``NUMBA_NUM_THREADS=1``),
so "2 workers" means 2 cores for either library.  Times are the best of ``rounds``, a 1-worker and a
2-worker cluster alternating (one alive at a time); every timed run reads fresh input keys.

    python scripts/bench_dask.py [--size 8192] [--chunk 2048] [--rounds 3] [--dir /tmp/nc-dask]
"""

import argparse
import os
import shutil
import time

import dask
import dask.array as da
import numpy as np
from distributed import Client, LocalCluster, wait

import numbaconv.dask as ncd


def _status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _reset_peak():
    """Linux: restart the process's peak-RSS count (VmHWM) at its current RSS."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _run(client, job):
    """Seconds for ``job()`` and the largest rise of a worker's peak RSS over its RSS before."""
    before = client.run(_reset_peak)
    t = time.perf_counter()
    job()
    seconds = time.perf_counter() - t
    peak = client.run(_status, "VmHWM")
    return seconds, max(peak[w] - before[w] for w in peak)


def _cluster(workers):
    # one Numba thread per worker, in the environment the worker process starts with: Numba
    # reads NUMBA_NUM_THREADS at import, and LocalCluster(env=...) sets it only after a spawned
    # worker has imported this script (and numba with it) -- those workers ran every task on
    # both cores (2 workers x 2 OpenMP threads on 2 vCPUs: tasks 2.2x slower side by side) and
    # a worker's first compile after its threads started raised Numba's "Cannot set
    # NUMBA_NUM_THREADS to a different value once the threads have been launched"
    environ = {"NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               silence_logs=40)
    return cluster, Client(cluster, set_as_default=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/numbaconv-dask-bench")
    args = ap.parse_args()
    from dask_image import ndfilters

    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    src = os.path.join(args.dir, "image.zarr")
    n, c = args.size, args.chunk
    image = da.random.default_rng(0).standard_normal((n, n), chunks=c, dtype=np.float32)
    da.to_zarr(image, src)  # a real on-disk store, chunked like the computation
    kernel = np.random.default_rng(1).standard_normal((5, 5)).astype(np.float32)
    multi_w = np.random.default_rng(2).standard_normal((16, 3, 3, 3)).astype(np.float32)
    mpix = n * n / 1e6

    flipped = kernel[::-1, ::-1].copy()[None, None]  # cross-correlation with it = SciPy's convolution

    def ours(img):
        return ncd.conv2d(img[None, None], flipped, padding=2)[0, 0]  # zero padding, as mode="constant"

    def theirs(img):
        return ndfilters.convolve(img, kernel, mode="constant", cval=0.0)

    def rgb_to_16(img):  # what dask-image cannot do: channel mixing (3 -> 16 channels, NHWC)
        x = img[None, :, :, None]
        x = da.concatenate([x, x * 0.5, x * 0.25], axis=3).rechunk({3: -1})
        return ncd.conv2d(x, multi_w, padding=1, layout="NHWC", weight_layout="OHWI", activation="relu")

    def in_memory(fn, client, round_):
        img = (da.from_zarr(src) + np.float32(round_ + 1)).persist()  # fresh keys each run
        wait(img)
        return lambda: wait(fn(img).persist())

    def zarr_to_zarr(fn, client, round_):
        out = os.path.join(args.dir, "out.zarr")
        return lambda: da.to_zarr(fn(da.from_zarr(src) + np.float32(round_)), out, overwrite=True)

    results = {}
    jobs = (("numbaconv", ours), ("dask-image", theirs), ("numbaconv 3->16 NHWC", rgb_to_16))
    for round_ in range(args.rounds):
        for workers in (1, 2):  # one cluster at a time: an idle one costs the other CPU on a small machine
            cluster, client = _cluster(workers)
            with client.as_current():
                small = da.from_zarr(src)[: 2 * c, : 2 * c].rechunk(c // 2)
                for _, fn in jobs:  # load the kernels in every worker (untimed)
                    fn(small).compute()
                for mode, prepare in (("in memory", in_memory), ("zarr -> zarr", zarr_to_zarr)):
                    for name, fn in jobs:
                        if mode == "in memory" and "16" in name:
                            continue  # (its persisted result alone would be 4 GiB)
                        seconds = _run(client, prepare(fn, client, round_))[0]
                        best = results.get((mode, name, workers))
                        results[(mode, name, workers)] = min(seconds, best) if best else seconds
            client.close()
            cluster.close()
    memory = {}  # zarr -> zarr on fresh worker processes: the peak is the job's own
    for workers in (1, 2):
        for name, fn in jobs:
            cluster, client = _cluster(workers)
            with client.as_current():
                fn(da.from_zarr(src)[: 2 * c, : 2 * c].rechunk(c // 2)).compute()  # load the kernels
                memory[(name, workers)] = _run(client, zarr_to_zarr(fn, client, 0))[1]
            client.close()
            cluster.close()
    x = da.from_zarr(src)[None, None]
    bound = ncd.block_bytes(x, kernel[None, None], padding=2)
    x3 = da.concatenate([x.transpose(0, 2, 3, 1)] * 3, axis=3)
    bound3 = ncd.block_bytes(x3, multi_w, padding=1, layout="NHWC", weight_layout="OHWI")
    print(f"{n}x{n} float32 image ({n * n * 4 / 2**20:.0f} MiB), zarr chunks {c}x{c} "
          f"({c * c * 4 / 2**20:.0f} MiB); 5x5 kernel, zero padding; one task and one Numba thread per worker")
    for mode in ("in memory", "zarr -> zarr"):
        print(f" {mode}:")
        for name, _ in jobs:
            if (mode, name, 1) not in results:
                continue
            b = bound3 if "16" in name else bound
            row = []
            for workers in (1, 2):
                seconds = results[(mode, name, workers)]
                row.append(f"{workers} worker{'s' if workers > 1 else ' '}: {mpix / seconds:7.1f} MPix/s")
                if mode == "zarr -> zarr":
                    row[-1] += f" (peak +{memory[(name, workers)] / 2**20:4.0f} MiB/worker)"
            print(f"  {name:22s} " + "   ".join(row)
                  + (f"   block_bytes {b / 2**20:.0f} MiB" if "numbaconv" in name else ""))
        for workers in (1, 2):
            speedup = results[(mode, "dask-image", workers)] / results[(mode, "numbaconv", workers)]
            print(f"  numbaconv / dask-image, {workers} worker(s): {speedup:.1f}x")


if __name__ == "__main__":
    main()
