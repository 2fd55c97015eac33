"""Turn ``numbaconv bench --json FILE`` into the README's markdown table.

    python scripts/bench_to_markdown.py bench.json > table.md

One row per shape and layout: torch's and onnxruntime's time and GFLOP/s (onnxruntime:
NCHW only), then for each algorithm its time, GFLOP/s and speedups over torch and
onnxruntime (> 1: faster than the peer).  The machine line names the CPU, its ISA, the
LLVM target and the measured FMA peak.
"""

import json
import sys


def _peer(cell):
    return f"{cell['ms']:.2f} ({cell['gflops']:.0f})" if cell else "-"


def _cell(c):
    if c is None:
        return "-"
    text = f"{c['ms']:.2f} ms, {c['gflops']:.0f} GF/s"
    ratios = [f"**{c['speedup_vs_torch']:.2f}x**" if c.get("speedup_vs_torch") else None,
              f"{c['speedup_vs_onnxruntime']:.2f}x ort" if c.get("speedup_vs_onnxruntime") else None]
    ratios = [r for r in ratios if r]
    return text + (", " + " / ".join(ratios) if ratios else "")


def main(path):
    data = json.load(open(path))
    algos = [a for a in data["config"]["algorithms"] if a not in ("torch", "onnxruntime")]
    cells = {(r["shape"], r["layout"], r["algorithm"]): r for r in data["results"]}
    print("| shape | layout | torch ms (GFLOP/s) | onnxruntime ms (GFLOP/s) | " + " | ".join(algos) + " |")
    print("|---|---|---|---|" + "---|" * len(algos))
    for shape in data["config"]["shapes"]:
        for layout in data["config"]["layouts"]:
            row = [shape, layout, _peer(cells.get((shape, layout, "torch"))),
                   _peer(cells.get((shape, layout, "onnxruntime")))]
            row += [_cell(cells.get((shape, layout, a))) for a in algos]
            print("| " + " | ".join(row) + " |")
    for peer in ("torch", "onnxruntime"):
        geo = data.get(f"geomean_speedup_vs_{peer}") or {}
        if geo:
            print()
            print(f"Geometric-mean speedup vs {peer}{' (NCHW rows)' if peer == 'onnxruntime' else ''}: "
                  + ", ".join(f"{a} {v:.2f}x" for a, v in geo.items()))
    m = data["machine"]
    target = m.get("llvm_target") or {}
    print()
    print(f"Machine: {m['cpu']} ({', '.join(m.get('isa') or [])}), {m['cpu_count']} cores, LLVM target "
          f"{target.get('cpu', '?')} ({8 * target.get('vector_bytes', 0)}-bit vectors), {m['threads']} threads each "
          f"for numbaconv, torch and onnxruntime; numba {m['numba']}, torch {m['torch']}, onnxruntime "
          f"{m.get('onnxruntime')}, numpy {m['numpy']}; commit {(m['commit'] or '?')[:7]}; measured FMA peak "
          f"{m['peak_gflops']:.0f} GFLOP/s, sgemm {m.get('sgemm_gflops') or 0:.0f} GFLOP/s.")


if __name__ == "__main__":
    main(sys.argv[1])
