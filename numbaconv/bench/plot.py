"""``numbaconv bench --plot FILE.png``: GFLOP/s per shape, one bar per implementation, peak line.

matplotlib is optional (``pip install 'numbaconv[bench]'``); it is imported only here.
"""

__all__ = ["require_matplotlib", "plot_results"]

_MISSING = ("--plot needs matplotlib, which is not installed; "
            "install it with `pip install matplotlib` or `pip install 'numbaconv[bench]'`")


def require_matplotlib():
    """Import matplotlib with the non-interactive Agg backend; a clear error when it is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit(f"numbaconv bench: {_MISSING}") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_results(results, path, peak_gflops=None, title=None):
    """Write a bar chart of ``results`` (from :func:`numbaconv.bench.suite.run_suite`) to ``path``.

    One panel per layout; groups of bars per shape; one bar per implementation (torch
    included); a dashed line at ``peak_gflops``.  The y axis is logarithmic: the direct
    loop and BLAS-bound kernels differ by more than an order of magnitude.
    """
    plt = require_matplotlib()
    layouts = list(dict.fromkeys(r["layout"] for r in results))
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    impls = list(dict.fromkeys(r["algorithm"] for r in results))
    value = {(r["shape"], r["layout"], r["algorithm"]): r["gflops"] for r in results}

    width = 0.8 / max(len(impls), 1)
    fig, axes = plt.subplots(len(layouts), 1, figsize=(max(8.0, 1.1 * len(shapes) + 4), 3.8 * len(layouts)),
                             squeeze=False, sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, layout in zip(axes[:, 0], layouts):
        for j, impl in enumerate(impls):
            xs = [i + (j - (len(impls) - 1) / 2) * width for i in range(len(shapes))]
            ys = [value.get((s, layout, impl), 0.0) for s in shapes]
            color = "0.3" if impl == "torch" else colors[j % len(colors)]
            ax.bar(xs, ys, width, label=impl, color=color)
        if peak_gflops:
            ax.axhline(peak_gflops, color="red", linestyle="--", linewidth=1,
                       label=f"peak {peak_gflops:g} GFLOP/s")
        ax.set_yscale("log")
        ax.set_ylabel("GFLOP/s (log)")
        ax.set_title(layout + (" (OIHW weights)" if layout == "NCHW" else " (HWIO weights)"), fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0)
    axes[-1, 0].set_xticks(range(len(shapes)))
    axes[-1, 0].set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
