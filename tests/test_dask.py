"""numbaconv.dask: lazy chunked convolution, equal to the in-memory ``numbaconv.conv2d`` for
every argument form and odd chunkings; on a ``distributed.LocalCluster`` of worker processes
(started and stopped here, no outside service), including a worker killed mid-computation.
The oracle is numbaconv's in-memory conv2d, itself tested against torch float64 elsewhere;
the chunked result must equal it within float rounding."""

import os
import signal
import subprocess
import sys
import time

import dask.array as da
import distributed
import numpy as np
import pytest

import numbaconv
import numbaconv.dask as ncd

CASES = [
    ("plain", {}),
    ("pad1", {"padding": 1}),
    ("stride2", {"stride": 2, "padding": 1}),
    ("stride3_dil2", {"stride": 3, "padding": (2, 0), "dilation": 2}),
    ("same_reflect", {"padding": "same", "padding_mode": "reflect"}),
    ("same_stride2", {"padding": "same", "stride": 2}),
    ("asym_circular", {"padding": ((2, 1), (0, 3)), "padding_mode": "circular"}),
    ("replicate_s21", {"padding": 2, "padding_mode": "replicate", "stride": (2, 1)}),
    ("groups_relu", {"groups": 2, "padding": 1, "activation": "relu"}),
    ("depthwise_silu", {"groups": 4, "padding": 1, "activation": "silu"}),
    ("1x1_stride2", {"stride": 2, "kernel": (1, 1)}),
    ("5x3_stride_gt_kernel", {"stride": 4, "kernel": (5, 3), "padding": 1}),
]
CHUNKINGS = {"uneven": (2, 7, 5), "rows_of_1": (1, 1, 19), "cols_of_3": (3, 5, 3), "one_chunk": (3, 23, 19)}


def _problem(layout, kwargs, dtype=np.float32, seed=0):
    kwargs = dict(kwargs)
    r, s = kwargs.pop("kernel", (3, 3))
    groups = kwargs.get("groups", 1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 4, 23, 19)).astype(dtype)
    w = rng.standard_normal((8, 4 // groups, r, s)).astype(dtype)
    b = rng.standard_normal(8).astype(dtype)
    if layout == "NHWC":
        x, w = np.ascontiguousarray(x.transpose(0, 2, 3, 1)), numbaconv.convert_layout(w, "OIHW", "HWIO")
    return x, w, b, kwargs


def _chunks(layout, n_h_w):
    n, h, w = n_h_w
    return (n, -1, h, w) if layout == "NCHW" else (n, h, w, -1)


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=list(CHUNKINGS))
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_equals_in_memory_conv2d(name, kwargs, layout, chunking):
    x, w, b, kw = _problem(layout, kwargs)
    expected = numbaconv.conv2d(x, w, b, layout=layout, **kw)
    xd = da.from_array(x, chunks=_chunks(layout, CHUNKINGS[chunking]))
    y = ncd.conv2d(xd, w, b, layout=layout, **kw)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    got = y.compute(scheduler="sync")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # output chunk boundaries sit on the stride's grid of the (padded) input
    ha, wa = layout.index("H"), layout.index("W")
    assert sum(y.chunks[ha]) == expected.shape[ha] and sum(y.chunks[wa]) == expected.shape[wa]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_same_padding_keeps_the_chunks(layout):
    """Stride 1, "same": the result is chunked exactly like the input (regular chunks, as
    ``to_zarr`` needs), channels in one chunk."""
    chunks = (1, -1, 256, 200) if layout == "NCHW" else (1, 256, 200, -1)
    shape = (2, 3, 700, 600) if layout == "NCHW" else (2, 700, 600, 3)
    x = da.zeros(shape, chunks=chunks, dtype=np.float32)
    w = np.zeros((8, 3, 5, 5), np.float32) if layout == "NCHW" else np.zeros((5, 5, 3, 8), np.float32)
    y = ncd.conv2d(x, w, padding="same", layout=layout)
    ha, wa = layout.index("H"), layout.index("W")
    assert y.chunks[ha] == x.chunks[ha] and y.chunks[wa] == x.chunks[wa]


def test_float64_unbatched_and_residual():
    x, w, b, kw = _problem("NCHW", {"padding": 1}, dtype=np.float64)
    res = np.random.default_rng(1).standard_normal((3, 8, 23, 19))
    expected = numbaconv.conv2d(x, w, b, padding=1, activation="relu6", residual=res)
    y = ncd.conv2d(da.from_array(x, chunks=(1, -1, 6, 8)), w, b, padding=1, activation="relu6",
                   residual=da.from_array(res, chunks=(2, 3, 5, 19)))
    np.testing.assert_allclose(y.compute(scheduler="sync"), expected, rtol=1e-12, atol=1e-12)
    y3 = ncd.conv2d(da.from_array(x[1], chunks=(-1, 5, 7)), w, b, padding=1)
    assert y3.ndim == 3
    np.testing.assert_allclose(y3.compute(scheduler="sync"), numbaconv.conv2d(x[1], w, b, padding=1),
                               rtol=1e-12, atol=1e-12)


def test_nan_and_inf_propagate_as_in_memory():
    x, w, b, kw = _problem("NCHW", {})
    x[0, 1, 5, 5], x[2, 0, 0, 0], w[3, 2, 1, 1] = np.nan, np.inf, np.inf
    expected = numbaconv.conv2d(x, w, b, padding=1)
    got = ncd.conv2d(da.from_array(x, chunks=(1, -1, 6, 6)), w, b, padding=1).compute(scheduler="sync")
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(np.nan_to_num(got), np.nan_to_num(expected), rtol=1e-5, atol=1e-4)


def test_building_the_graph_computes_nothing_and_embeds_the_weights_once():
    import cloudpickle
    import dask

    calls = []

    def source(block_info=None):
        calls.append(block_info)
        return np.ones(block_info[None]["chunk-shape"], np.float32)

    x = da.map_blocks(source, dtype=np.float32, chunks=((1, 1), (4,), (16, 16, 16), (16, 16)),
                      meta=np.empty((0, 0, 0, 0), np.float32))
    calls.clear()
    w = np.random.default_rng(0).standard_normal((32, 4, 3, 3)).astype(np.float32)
    y = ncd.conv2d(x, w, padding=1, stride=2)
    assert calls == []  # lazy
    graph = dict(y.__dask_graph__())
    blob = cloudpickle.dumps(graph)  # (as distributed ships it)
    assert blob.count(w.tobytes()) == 1, "the weights must be one key of the graph, not one copy per task"
    assert len(y.to_delayed().ravel()) == 2 * 3 * 2
    dask.compute(y, scheduler="sync")
    assert calls


@pytest.mark.parametrize("kwargs,error,match", [
    ({"out": np.empty(1)}, TypeError, "out"),
    ({"padding": -1}, ValueError, "padding"),
    ({"groups": 3}, ValueError, "groups"),
    ({"activation": "gelu"}, ValueError, "activation"),
    ({"algorithm": "fft"}, ValueError, "algorithm"),
    ({"padding_mode": "mirror"}, ValueError, "padding_mode"),
])
def test_errors_before_any_graph(kwargs, error, match):
    x = da.zeros((1, 4, 8, 8), chunks=(1, 4, 4, 4), dtype=np.float32)
    w = np.zeros((4, 4, 3, 3), np.float32)
    with pytest.raises(error, match=match):
        ncd.conv2d(x, w, **kwargs)


@pytest.mark.parametrize("residual,error,match", [
    (da.zeros((1, 4, 8, 8), dtype=np.float64, chunks=4), TypeError, "residual has dtype float64"),
    (da.zeros((1, 4, 7, 8), dtype=np.float32, chunks=4), ValueError, "residual has shape"),
    ([0.0], TypeError, "residual must be"),
])
def test_residual_errors(residual, error, match):
    x = da.zeros((1, 4, 8, 8), chunks=(1, 4, 4, 4), dtype=np.float32)
    with pytest.raises(error, match=match):
        ncd.conv2d(x, np.zeros((4, 4, 3, 3), np.float32), padding=1, residual=residual)


def test_errors_name_dtype_and_type():
    w = np.zeros((4, 4, 3, 3), np.float32)
    with pytest.raises(TypeError, match="dask"):
        ncd.conv2d(np.zeros((1, 4, 8, 8), np.float32), w)
    with pytest.raises(TypeError, match="dtype"):
        ncd.conv2d(da.zeros((1, 4, 8, 8), dtype=np.float64, chunks=4), w)


def test_a_larger_than_memory_result_is_not_refused():
    """The in-memory size check does not apply: only chunks must fit (2**40 pixels, lazily)."""
    x = da.zeros((1, 1, 2**20, 2**20), chunks=(1, 1, 4096, 4096), dtype=np.float32)
    y = ncd.conv2d(x, np.ones((4, 1, 3, 3), np.float32), padding=1)
    assert y.shape == (1, 4, 2**20, 2**20)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_block_bytes_bounds_what_a_task_allocates(layout):
    """One task's peak of traced allocations (NumPy reports its buffers to tracemalloc) stays
    within ``block_bytes``, and the bound is not loose by more than 3x of that peak plus the
    four input chunks it reads (which a worker holds or fetches)."""
    import tracemalloc

    shape = (2, 16, 512, 512) if layout == "NCHW" else (2, 512, 512, 16)
    chunks = (1, 16, 128, 128) if layout == "NCHW" else (1, 128, 128, 16)
    x = da.random.default_rng(0).standard_normal(shape, chunks=chunks, dtype=np.float32).persist(scheduler="sync")
    w = np.ones((32, 16, 3, 3), np.float32)
    kw = dict(padding=1, layout=layout, weight_layout="OIHW")
    y = ncd.conv2d(x, w, **kw)
    y.blocks[0, 0, 0, 0].compute(scheduler="sync")  # compile, caches
    ncd._THREAD.__dict__.clear()  # as on a fresh worker thread: the task allocates its block buffer
    tracemalloc.start()
    y.blocks[1, 0, 1, 2].compute(scheduler="sync") if layout == "NCHW" else \
        y.blocks[1, 1, 2, 0].compute(scheduler="sync")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    bound = ncd.block_bytes(x, w, **kw)
    assert peak <= bound <= 3 * (peak + 4 * 16 * 128 * 128 * 4), (peak, bound)


def test_import_numbaconv_imports_no_dask():
    code = "import sys, numbaconv; assert not {'dask', 'distributed'} & set(sys.modules), 'dask imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# --- a real cluster of worker processes -------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                       silence_logs=40)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_on_a_cluster_of_processes(client):
    x, w, b, kw = _problem("NHWC", {"stride": 2, "padding": "same", "padding_mode": "reflect"})
    y = ncd.conv2d(da.from_array(x, chunks=(1, 7, 6, -1)), w, b, layout="NHWC", **kw)
    np.testing.assert_allclose(y.compute(), numbaconv.conv2d(x, w, b, layout="NHWC", **kw), rtol=1e-5, atol=1e-5)
    assert len(client.run(os.getpid)) == 2


def test_worker_killed_mid_computation_loses_nothing(client):
    """SIGKILL one worker process while tasks are running: the nanny restarts it, the
    scheduler recomputes what it held, and the result is complete and correct."""
    xd = da.random.default_rng(5).standard_normal((8, 16, 256, 256), chunks=(1, -1, 64, 64), dtype=np.float32)
    w = np.random.default_rng(6).standard_normal((16, 16, 3, 3)).astype(np.float32)
    expected = numbaconv.conv2d(xd.compute(), w, padding=1)  # (each chunk's seed is in the graph: recomputable)
    # a chain of layers: each block waits for its neighbours, so a lost worker's results are needed
    y = ncd.conv2d(ncd.conv2d(xd, w, padding=1), np.eye(16, dtype=np.float32)[:, :, None, None])
    before = client.run(os.getpid)
    future = client.compute(y)
    deadline = time.time() + 30
    while not any(client.processing().values()) and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # some results held by workers, more to run
    assert not future.done(), "finished before the kill: make the problem larger"
    victim = sorted(before.values())[0]
    os.kill(victim, signal.SIGKILL)
    got = future.result(timeout=120)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    after = client.run(os.getpid)
    assert victim not in after.values()


def _compiles_in_this_process(x, w):
    """In a worker: the number of functions Numba compiles (not loads from its cache) for one
    conv2d like the dask tasks', and the seconds it takes."""
    from numba.core.event import install_recorder

    t = time.perf_counter()
    with install_recorder("numba:compile") as rec:
        numbaconv.conv2d(x, w, padding=0)
    return sum(1 for _, ev in rec.buffer if ev.is_end), time.perf_counter() - t


def test_fresh_worker_loads_kernels_from_the_cache(client):
    """Worker processes started after the kernels were compiled (here, by the tests above)
    compile nothing: their first task loads numbaconv's kernels from Numba's on-disk cache."""
    x = np.ones((1, 16, 18, 18), np.float32)
    w = np.ones((16, 16, 3, 3), np.float32)
    xd = da.from_array(x[:, :, 1:-1, 1:-1], chunks=(1, -1, 8, 8))
    ncd.conv2d(xd, w, padding=1).compute()  # compiled (or loaded) by these workers at the latest now
    client.restart()  # fresh worker processes
    t = time.perf_counter()
    ncd.conv2d(xd, w, padding=1).compute()
    first = time.perf_counter() - t
    client.restart()
    probes = client.run(_compiles_in_this_process, x, w)
    assert all(n == 0 for n, _ in probes.values()), f"fresh workers compiled kernels: {probes}"
    print(f"first dask task on fresh workers: {first:.2f} s; first conv2d in a fresh worker: "
          f"{', '.join(f'{s:.2f} s' for _, s in probes.values())}")
