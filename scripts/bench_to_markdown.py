"""Turn ``numbaconv bench --json FILE`` into the README's markdown table.

    python scripts/bench_to_markdown.py bench.json > table.md

One row per shape and layout: torch's time and GFLOP/s, then for each algorithm its
time, GFLOP/s and speedup over torch (> 1: faster than torch).
"""

import json
import sys


def main(path):
    data = json.load(open(path))
    algos = [a for a in data["config"]["algorithms"] if a != "torch"]
    cells = {(r["shape"], r["layout"], r["algorithm"]): r for r in data["results"]}
    print("| shape | layout | torch ms (GFLOP/s) | " + " | ".join(algos) + " |")
    print("|---|---|---|" + "---|" * len(algos))
    for shape in data["config"]["shapes"]:
        for layout in data["config"]["layouts"]:
            t = cells.get((shape, layout, "torch"))
            row = [shape, layout, f"{t['ms']:.2f} ({t['gflops']:.0f})" if t else "-"]
            for a in algos:
                c = cells.get((shape, layout, a))
                row.append("-" if c is None else
                           f"{c['ms']:.2f} ms, {c['gflops']:.0f} GF/s, **{c['speedup_vs_torch']:.2f}x**"
                           if c.get("speedup_vs_torch") else f"{c['ms']:.2f} ms, {c['gflops']:.0f} GF/s")
            print("| " + " | ".join(row) + " |")
    geo = data.get("geomean_speedup_vs_torch") or {}
    if geo:
        print()
        print("Geometric-mean speedup vs torch: " + ", ".join(f"{a} {v:.2f}x" for a, v in geo.items()))
    m = data["machine"]
    print()
    print(f"Machine: {m['cpu']}, {m['cpu_count']} cores, {m['threads']} threads each for numbaconv and torch; "
          f"numba {m['numba']}, torch {m['torch']}, numpy {m['numpy']}; commit {m['commit'][:7]}; "
          f"peak taken as {m['peak_gflops']:.0f} GFLOP/s.")


if __name__ == "__main__":
    main(sys.argv[1])
