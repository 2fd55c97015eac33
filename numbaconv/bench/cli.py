"""Command line: ``numbaconv bench`` (also ``python -m numbaconv bench``).

Runs SPEC.md's public benchmark suite (float32) for every algorithm in
``numbaconv.algorithms()`` plus ``auto``, in NCHW (OIHW weights) and NHWC (HWIO weights),
and prints ms, GFLOP/s, % of this machine's measured FMA peak and the speedups over torch
(both layouts) and onnxruntime (NCHW) measured in the same process with the same thread count.  See :mod:`numbaconv.bench.suite` for the method.
"""

import argparse
import json
import sys

from . import suite as bench

__all__ = ["main"]


def _csv(value):
    return [item.strip() for item in value.split(",") if item.strip()]


def _parser():
    parser = argparse.ArgumentParser(prog="numbaconv", description="numbaconv command line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser(
        "bench", help="run the public benchmark suite against torch and onnxruntime",
        description="Time numbaconv.conv2d on SPEC.md's public suite (float32) for every algorithm "
                    "and layout, next to torch (both layouts) and onnxruntime (NCHW) in the same "
                    "process with the same thread count, on this machine's measured FMA peak.")
    p.add_argument("--quick", action="store_true",
                   help="fewer repeats (~0.1 s per cell instead of ~0.5 s, at least 3): a rough table in a fraction of the time")
    p.add_argument("--algorithms", type=_csv, metavar="A,B",
                   help="comma-separated algorithms (default: all of numbaconv.algorithms() and auto)")
    p.add_argument("--layouts", type=_csv, metavar="L,L", default=list(bench.LAYOUTS),
                   help="comma-separated activation layouts (default: NCHW,NHWC)")
    p.add_argument("--shapes", type=_csv, metavar="NAME,...", help="comma-separated suite shape names (default: all)")
    p.add_argument("--threads", type=int, default=bench.DEFAULT_THREADS,
                   help="threads for numbaconv and torch alike (default: %(default)s)")
    p.add_argument("--peak", type=float, default=None, metavar="GFLOPS",
                   help="machine peak in GFLOP/s for the %% column (default: measured here with an FMA "
                        "probe at the compile target's full vector width)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="target time per cell for the adaptive repeat count (default 0.5, 0.1 with --quick)")
    p.add_argument("--rounds", type=int, default=1, metavar="R",
                   help="sweep the suite R times and keep each cell's best round median (a shared "
                        "machine's bursts of load spoil single blocks); default 1")
    p.add_argument("--no-torch", action="store_true", help="do not time torch even if it is installed")
    p.add_argument("--no-onnxruntime", action="store_true",
                   help="do not time onnxruntime even if it is installed (the 'bench' extra installs it)")
    p.add_argument("--json", metavar="FILE", help="write every measurement and the machine's description as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of GFLOP/s per shape (needs matplotlib)")
    p.add_argument("--first-call", action="store_true",
                   help="also measure conv2d's first-call latency in fresh processes with a cold and a warm "
                        "Numba cache")
    p.add_argument("--first-call-only", action="store_true", help="only the first-call measurement, no suite")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--models", type=_csv, metavar="M,M", default=None,
                   help="instead of the layer suite: torchvision models through numbaconv.torch.convert against "
                        "torch eager and onnxruntime ('all' = resnet18,resnet50,mobilenet_v2,mobilenet_v3_large,"
                        "efficientnet_b0; needs torchvision)")
    p.add_argument("--batches", type=_csv, metavar="B,B", default=["1", "8"], help="--models batch sizes (default 1,8)")
    # Tests only: the tiny stand-in shapes (also $NUMBACONV_BENCH_SUITE=tiny).
    p.add_argument("--suite", choices=("public", "tiny"), default=None, help=argparse.SUPPRESS)

    import numbaconv.cache as cache
    w = sub.add_parser(
        "warmup", help="compile kernels ahead into Numba's cache (Docker builds, CI, dask workers)",
        description="Run the given layers once, in worker processes, so their kernels are compiled into "
                    "Numba's on-disk cache (NUMBA_CACHE_DIR); prints what compiled and how long it took. "
                    "A no-op when the cache is warm.")
    w.add_argument("--model", choices=sorted(cache.MODELS),
                   help="a named architecture's conv layers (224x224, batch 1), or 'all': every kernel "
                        "family of this CPU with every host algorithm")
    w.add_argument("--layer", action="append", default=[], metavar="N,C,H,W,K,R,S[,STRIDE[,PAD[,GROUPS]]]",
                   help="a layer geometry (repeatable)")
    w.add_argument("--dtypes", type=_csv, default=["float32"], metavar="D,D", help="default: float32")
    w.add_argument("--layouts", type=_csv, default=["NCHW", "NHWC"], metavar="L,L", help="default: NCHW,NHWC")
    w.add_argument("--algorithms", type=_csv, default=["auto"], metavar="A,B", help="default: auto")
    w.add_argument("--processes", type=int, default=None, help="worker processes (default: one per dtype x layout)")
    w.add_argument("--epilogue", action="store_true",
                   help="also the fused-epilogue variants (activation=, residual=, numbaconv.torch.convert) "
                        "and the max pooling of converted models")

    t = sub.add_parser(
        "tune", help="measure this machine's block sizes and auto's choices; store them as wisdom",
        description="Measure numbaconv's tuning knobs (cache-block budgets, thresholds) and auto's algorithm "
                    "choices on this machine, and store what beats the defaults in a JSON file keyed by the "
                    "CPU Numba compiles for (beside Numba's cache); later processes on this CPU use it "
                    "(NUMBACONV_WISDOM=0: ignore it).")
    t.add_argument("--model", choices=sorted(cache.MODELS), help="also a named architecture's conv layers")
    t.add_argument("--layer", action="append", default=[], metavar="N,C,H,W,K,R,S[,STRIDE[,PAD[,GROUPS]]]",
                   help="also this layer geometry (repeatable)")
    t.add_argument("--no-suite", action="store_true", help="leave the public benchmark suite out")
    t.add_argument("--layouts", type=_csv, default=list(bench.LAYOUTS), metavar="L,L", help="default: NCHW,NHWC")
    t.add_argument("--dtypes", type=_csv, default=["float32"], metavar="D,D", help="default: float32")
    t.add_argument("--knobs", type=_csv, default=None, metavar="K,K", help="only these knobs (default: all)")
    t.add_argument("--no-choices", action="store_true", help="tune the knobs only, not auto's per-layer choices")
    t.add_argument("--rounds", type=int, default=5, help="interleaved rounds per measurement (default 5)")
    t.add_argument("--threads", type=int, default=None, help="threads (default: Numba's, i.e. every core)")
    t.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    t.add_argument("--output", metavar="FILE", help="write the wisdom here instead of this machine's wisdom path")
    t.add_argument("--show", action="store_true", help="print the wisdom in use and its path, measure nothing")
    t.add_argument("--forget", action="store_true", help="delete this machine's wisdom file, measure nothing")
    t.add_argument("--suite", choices=("public", "tiny"), default=None, help=argparse.SUPPRESS)
    return parser


def _fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def format_table(results, with_torch, with_onnxruntime=False):
    """The results as a fixed-width text table (one row per shape x layout x implementation)."""
    peers = ["torch"] * bool(with_torch) + ["onnxruntime"] * bool(with_onnxruntime)
    head = ["shape", "layout", "algorithm", "ms", "GFLOP/s", "% peak"] + [f"vs {p_}" for p_ in peers]
    rows = []
    for r in results:
        row = [r["shape"], r["layout"], r["algorithm"], _fmt(r["ms"], ".3f"), _fmt(r["gflops"], ".1f"),
               _fmt(r["pct_peak"], ".1f")]
        for peer in peers:
            value = r.get(f"speedup_vs_{peer}")
            row.append(_fmt(value, ".2f") + ("x" if value else ""))
        rows.append(row)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    left = {0, 1, 2}

    def line(cells):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for r, row in zip(results, rows):
        key = (r["shape"], r["layout"])
        if prev is not None and key != prev:
            out.append("")
        prev = key
        out.append(line(row))
    return "\n".join(out)


def format_first_call(rows):
    head = ["algorithm", "layout", "cache", "import s", "first call s", "second call s", "process s"]
    body = [[r["algorithm"], r["layout"], r["cache"], f"{r['import_s']:.2f}", f"{r['first_call_s']:.2f}",
             f"{r['second_call_s']:.4f}", f"{r['process_s']:.2f}"] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def _cmd_models(args, out):
    from . import models

    names = _select("models", list(models.MODELS) if args.models == ["all"] else args.models, list(models.MODELS))
    machine = bench.machine_info(threads=args.threads)
    print(f"numbaconv {machine['numbaconv']} bench --models: {machine['cpu']}, {args.threads} threads, float32, "
          "224x224, random weights; ms are medians; glibc's mmap threshold raised for every peer "
          "(numbaconv.bench.models.steady_allocator)", file=out)
    rows = models.measure(names, batches=[int(b) for b in args.batches], threads=args.threads,
                          seconds=0.5 if args.quick else 2.0, onnxruntime=not args.no_onnxruntime, out=out)
    if args.json:
        import json
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "models": rows}, f, indent=1)
    return 0


def _select(kind, requested, available):
    if requested is None:
        return list(available)
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise SystemExit(f"numbaconv bench: unknown {kind} {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(available)}")
    if not requested:
        raise SystemExit(f"numbaconv bench: --{kind} is empty")
    return list(requested)


def cmd_bench(args, out=None):
    out = out if out is not None else sys.stdout
    if args.models is not None:
        return _cmd_models(args, out)
    suite = bench.active_suite(args.suite)
    shape_names = _select("shapes", args.shapes, list(suite))
    layouts = _select("layouts", args.layouts, list(bench.LAYOUTS))
    algorithms = _select("algorithms", args.algorithms, list(bench.bench_algorithms()))
    if args.plot:
        from . import plot
        plot.require_matplotlib()  # fail now, not after minutes of measuring
    if args.rounds < 1:
        raise SystemExit(f"numbaconv bench: --rounds must be >= 1, got {args.rounds}")
    bench.set_threads(args.threads)
    with_torch = not args.no_torch and bench._import_torch() is not None
    with_ort = not args.no_onnxruntime and bench._import_onnxruntime() is not None
    budget = args.budget if args.budget is not None else (0.1 if args.quick else 0.5)
    min_repeats = 3
    peak = bench.measure_peak(args.threads)
    if args.peak is not None:
        peak["fma_gflops"] = args.peak
    machine = bench.machine_info(threads=args.threads, peak=peak)
    target = machine["llvm_target"] or {}
    print(f"numbaconv {machine['numbaconv']} bench: {machine['cpu']} ({', '.join(machine['isa']) or 'ISA unknown'}; "
          f"LLVM target {target.get('cpu', '?')}, {8 * target.get('vector_bytes', 0)}-bit vectors), "
          f"{args.threads} threads, float32", file=out)
    print(f"  numba {machine['numba']}, torch {machine['torch'] or 'not installed'}, onnxruntime "
          f"{machine['onnxruntime'] or 'not installed'}; FMA peak {peak['fma_gflops']:.0f} GFLOP/s "
          f"({'given' if args.peak is not None else 'measured'}), sgemm {peak['sgemm_gflops']:.0f} GFLOP/s "
          "(numpy BLAS, 2048^3)", file=out)
    wisdom = machine.get("wisdom")
    print("  tuning: " + (f"wisdom {wisdom['path']} ({len(wisdom['knobs'])} knobs, {wisdom['choices']} choices)"
                          if wisdom else "defaults (no `numbaconv tune` wisdom for this CPU)"), file=out)
    results = []
    if not args.first_call_only:
        shapes = [suite[name] for name in shape_names]
        results = bench.run_suite(shapes, layouts, algorithms, budget_s=budget, min_repeats=min_repeats,
                                  peak_gflops=peak["fma_gflops"], with_torch=with_torch,
                                  with_onnxruntime=with_ort,
                                  progress=not args.no_progress, rounds=args.rounds)
        print(format_table(results, with_torch, with_ort), file=out)
        for peer in ["torch"] * with_torch + ["onnxruntime"] * with_ort:
            geo = bench.geomean_speedups(results, peer)
            if geo:
                print(f"geometric mean speedup vs {peer}{' (NCHW)' if peer == 'onnxruntime' else ''}: "
                      + ", ".join(f"{name} {value:.2f}x" for name, value in geo.items()), file=out)
    first_call = None
    if args.first_call or args.first_call_only:
        first_call = bench.first_call_latency(algorithms, layouts=layouts, threads=args.threads,
                                              progress=not args.no_progress)
        print("\nfirst-call latency (fresh process; cold = empty NUMBA_CACHE_DIR, warm = same dir again):",
              file=out)
        print(format_first_call(first_call), file=out)
    if args.json:
        doc = dict(machine=machine,
                   config=dict(suite=bench.suite_name(args.suite),
                               shapes=shape_names, layouts=layouts, algorithms=algorithms,
                               quick=args.quick, budget_s=budget, min_repeats=min_repeats, dtype="float32",
                               rounds=args.rounds,
                               shape_table={n: suite[n]._asdict() for n in shape_names}),
                   results=results, geomean_speedup_vs_torch=bench.geomean_speedups(results),
                   geomean_speedup_vs_onnxruntime=bench.geomean_speedups(results, "onnxruntime"),
                   first_call=first_call)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}", file=out)
    if args.plot and results:
        from . import plot
        plot.plot_results(results, args.plot, peak_gflops=peak["fma_gflops"],
                          title=f"numbaconv bench, float32, {args.threads} threads — {machine['cpu']}")
        print(f"wrote {args.plot}", file=out)
    return 0


def cmd_warmup(args, out=None):
    import numbaconv
    if not (args.model or args.layer):
        raise SystemExit("numbaconv warmup: give --model or --layer")
    try:
        numbaconv.warmup(args.layer or None, model=args.model, dtypes=args.dtypes, layouts=args.layouts,
                         algorithms=args.algorithms, epilogue=args.epilogue, processes=args.processes, stream=out)
    except ValueError as exc:
        raise SystemExit(f"numbaconv warmup: {exc}")
    return 0


def cmd_tune(args, out=None):
    import numbaconv.tuning as tuning

    out = out if out is not None else sys.stdout
    if args.forget:
        path = tuning.wisdom_path()
        print(f"{'deleted' if tuning.forget() else 'no wisdom at'} {path}", file=out)
        return 0
    if args.show:
        w = tuning.wisdom()
        if w is None:
            print(f"no wisdom for this CPU ({tuning.wisdom_path()}): defaults and auto's heuristic", file=out)
        else:
            print(f"wisdom {tuning.wisdom_path()} ({w['target']['cpu']}):", file=out)
            print(json.dumps(dict(knobs=w["knobs"], choices=w["choices"]), indent=1), file=out)
        return 0
    from . import tune

    if args.threads is not None:
        bench.set_threads(args.threads)
    try:
        report = tune.tune(args.layer, model=args.model, suite=False if args.no_suite else (args.suite or True),
                           layouts=_select("layouts", args.layouts, list(bench.LAYOUTS)), dtypes=args.dtypes,
                           knobs=args.knobs, choices=not args.no_choices, rounds=args.rounds,
                           write=not args.dry_run, path=args.output,
                           progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as exc:
        raise SystemExit(f"numbaconv tune: {exc}")
    print(tune.format_report(report), file=out)
    return 0


def main(argv=None):
    args = _parser().parse_args(argv)
    if args.command == "bench":
        return cmd_bench(args)
    if args.command == "warmup":
        return cmd_warmup(args)
    if args.command == "tune":
        return cmd_tune(args)
    return 2  # pragma: no cover -- argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
