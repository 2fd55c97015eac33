"""``numbaconv tune``: measure this machine's tuning knobs and ``auto``'s choices, and store them
as wisdom (:mod:`numbaconv.tuning`) that later processes on the same CPU use.

Method (float32 unless asked, the threads Numba runs with, one process):

1. **knobs**, one after the other (coordinate descent, each under the values chosen before
   it): every candidate value of the knob (:data:`numbaconv.tuning.KNOBS`) runs every layer
   whose plan it changes, with the algorithm it belongs to.  The candidates are interleaved
   in ``rounds`` rounds (a shared machine's speed drifts within a minute; each candidate sees
   the same drift) and each cell keeps its fastest call.  A value replaces the default only
   if the geometric mean of its times over those layers is ``margin`` (3 %) below the
   default's.
2. **choices**, under the tuned knobs: every candidate algorithm of ``auto``
   (:func:`numbaconv.auto.candidates`) on every layer, interleaved the same way, through
   ``conv2d`` and through a :class:`numbaconv.Conv2dPlan` (its weights are prepared once, so
   no algorithm pays a weight cache's check there: the best can differ).  An entry is
   stored only where another algorithm beat the heuristic's pick by more than ``margin``;
   elsewhere the heuristic stays in charge (so noise cannot make ``auto`` worse).

Layers: the public suite by default (with a few few-channel 3x3 layers that straddle
``auto``'s Winograd threshold, :data:`THRESHOLD_LAYERS`), plus the conv layers of a named architecture
(``model=``, :data:`numbaconv.cache.MODELS`) and any given geometries, in each layout.
"""

import math
import time

import numpy as np

from numbaconv import auto, convert_layout, tuning
from numbaconv.cache import MODELS, _as_layer, model_layers
from numbaconv.problem import ConvProblem
from numbaconv.registry import REGISTRY

from . import suite as bench

__all__ = ["tune", "suite_layers", "format_report", "MARGIN"]

#: relative gain a tuned value or choice must show over the default (noise is a few %)
MARGIN = 0.03


#: with the public suite: stride-1 3x3 layers with few channels, on both sides of ``auto``'s
#: Winograd threshold (the suite's 3x3 layers have 3 or 64+ channels)
THRESHOLD_LAYERS = [(1, c, 56, 56, c, 3, 3, 1, 1) for c in (8, 16, 32)] + \
                   [(1, c, 28, 28, 2 * c, 3, 3, 1, 1) for c in (12, 24, 48)]


def suite_layers(name=None):
    """The public suite (or ``"tiny"``) as layer dicts (``x_shape`` NCHW, ``w_shape`` OIHW), and
    with the public suite the :data:`THRESHOLD_LAYERS`."""
    layers = [dict(label=s.name, x_shape=s.x_shape("NCHW"), w_shape=s.w_shape("NCHW"), stride=s.stride,
                   padding=s.pad, groups=s.groups) for s in bench.active_suite(name).values()]
    if bench.suite_name(name) == "public":
        layers += [_as_layer(layer) for layer in THRESHOLD_LAYERS]
    return layers


class _Case:
    """One layer in one layout and dtype, with its arrays and a runner per algorithm."""

    def __init__(self, layer, layout, dtype, seed=0):
        kw = {k: v for k, v in layer.items() if k in ("stride", "padding", "groups", "dilation")}
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(layer["x_shape"]).astype(dtype)
        w = rng.standard_normal(layer["w_shape"]).astype(dtype)
        w *= 1.0 / math.sqrt(np.prod(layer["w_shape"][1:]))
        weight_layout = bench.WEIGHT_LAYOUT[layout]
        x, w = convert_layout(x, "NCHW", layout), convert_layout(w, "OIHW", weight_layout)
        self.kw = dict(kw, layout=layout, weight_layout=weight_layout)
        self.x, self.w = x, w
        self.p = ConvProblem.from_args(x, w, None, **self.kw)
        self.out = np.empty(self.p.out_shape, dtype=dtype)
        self._plans = {}
        self.label = f"{layer.get('label') or _describe(layer)} {layout}" + ("" if dtype == "float32" else f" {dtype}")
        self.flops = self.p.flops

    @property
    def tunable(self):
        """The front door hands ``auto`` this very problem (no padding mode, no compaction)."""
        return self.p.compaction is None and self.p.padding_mode == "zeros"

    def runner(self, algorithm, prepared=False):
        """``conv2d`` with ``algorithm``, or (``prepared``) a :class:`numbaconv.Conv2dPlan` of it."""
        import numbaconv

        if prepared:
            if algorithm not in self._plans:
                self._plans[algorithm] = numbaconv.Conv2dPlan(self.w, None, algorithm=algorithm, **self.kw)
            plan = self._plans[algorithm]
            return lambda: plan(self.x, out=self.out)

        def run():
            numbaconv.conv2d(self.x, self.w, algorithm=algorithm, out=self.out, **self.kw)
        return run


def _describe(layer):
    n, c, h, w = layer["x_shape"]
    k, _, r, s = layer["w_shape"]
    extra = "".join(f" {name}={layer[name]}" for name, default in (("stride", 1), ("padding", 0), ("groups", 1))
                    if layer.get(name, default) != default)
    return f"{n}x{c}x{h}x{w} {k}x{r}x{s}{extra}"


def _best_call(fn, budget_s, warm):
    """Seconds of ``fn``'s fastest call in about ``budget_s`` (at least 2 calls)."""
    if not warm:
        fn()  # compile / pack / first touch: never timed
    best, start, calls = float("inf"), time.perf_counter(), 0
    while calls < 2 or (time.perf_counter() - start < budget_s and calls < 50):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        calls += 1
    return best


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 1.0


def _plan_signature(algorithm, p):
    if algorithm == "auto":  # auto's own thresholds: what it picks
        return auto.heuristic(p)
    impl = REGISTRY[algorithm].impl
    if algorithm == "tiled":
        return repr(sorted(impl.plan(p).items())) if impl.generic(p) else None
    if algorithm == "winograd":
        return repr(sorted(impl.plan(p).items())) if impl.applies(p) else None
    return None


def _affected(name, cases, fixed):
    """The cases whose plan ``name``'s candidate values change (``fixed``: knobs already tuned)."""
    algorithm = name.split(".")[0]
    out = []
    for case in cases:
        sigs = set()
        for value in tuning.KNOBS[name].candidates:
            with tuning.override(dict(fixed, **{name: value})):
                sigs.add(_plan_signature(algorithm, case.p))
        if len(sigs) > 1:
            out.append(case)
    return algorithm, out


def _sweep(variants, cases, rounds, budget_s):
    """``{variant: {case index: best seconds}}``: every (variant, case) cell timed once per
    round, rounds interleaved.  ``variants``: ``{label: (override dict, runner_of(case) ->
    callable or None)}``."""
    times = {v: {} for v in variants}
    for r in range(rounds):
        for i, case in enumerate(cases):
            for v, (values, runner_of) in variants.items():
                with tuning.override(values):
                    run = runner_of(case)
                    if run is None:
                        continue
                    t = _best_call(run, budget_s, warm=r > 0)
                times[v][i] = min(times[v].get(i, float("inf")), t)
    return times


def tune(layers=None, *, model=None, suite=True, layouts=bench.LAYOUTS, dtypes=("float32",), knobs=None,
         choices=True, rounds=5, budget_s=0.03, margin=MARGIN, write=True, path=None, progress=None):
    """Measure and (``write``) store this machine's wisdom; returns the report (a dict).

    ``layers``: extra geometries (``(N, C, H, W, K, R, S[, stride[, padding[, groups]]])`` or
    :func:`numbaconv.warmup`'s dicts); ``model``: a named architecture's layers; ``suite``:
    the public suite too (``"tiny"``: the tests' stand-ins); ``knobs``: names to tune (default
    all); ``progress``: a callable taking a line of text.
    """
    say = progress or (lambda line: None)
    specs = []
    if suite:
        specs += suite_layers(suite if isinstance(suite, str) else None)
    if model:
        if model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
        specs += [dict(layer, label=f"{model}/{i}") for i, layer in enumerate(model_layers(model))]
    specs += [_as_layer(layer) for layer in layers or ()]
    if not specs:
        raise ValueError("nothing to tune: give layers, a model, or keep the suite")
    for name in knobs or ():
        if name not in tuning.KNOBS:
            raise ValueError(f"knobs must name entries of numbaconv.tuning.KNOBS {sorted(tuning.KNOBS)}, got {name!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds!r}")
    knob_names = list(knobs) if knobs is not None else list(tuning.KNOBS)

    report = dict(knobs={}, layers={}, choices={}, threads=None)
    import numba
    report["threads"] = numba.get_num_threads()
    t_start = time.perf_counter()
    with tuning.defaults_only():
        cases = [c for c in (_Case(spec, layout, dtype) for spec in specs for layout in layouts for dtype in dtypes)
                 if c.tunable]
        fixed = {}
        for name in knob_names:
            knob = tuning.KNOBS[name]
            algorithm, affected = _affected(name, cases, fixed)
            if not affected:
                report["knobs"][name] = dict(default=knob.default, chosen=knob.default, layers=0, ratios={})
                say(f"{name}: no layer's plan depends on it; default {knob.default} kept")
                continue
            say(f"{name}: {len(knob.candidates)} values x {len(affected)} layers ({algorithm}) x {rounds} rounds")
            variants = {v: (dict(fixed, **{name: v}), lambda case, a=algorithm: case.runner(a)) for v in knob.candidates}
            times = _sweep(variants, affected, rounds, budget_s)
            ratios = {v: _geomean([times[v][i] / times[knob.default][i] for i in times[knob.default]])
                      for v in knob.candidates}
            best = min(knob.candidates, key=lambda v: ratios[v])
            chosen = best if ratios[best] < 1 - margin else knob.default
            if chosen != knob.default:
                fixed[name] = chosen
            report["knobs"][name] = dict(default=knob.default, chosen=chosen, layers=len(affected),
                                         ratios={str(v): round(r, 4) for v, r in ratios.items()},
                                         layer_labels=[c.label for c in affected])
        if choices:
            say(f"choices: {len(cases)} layers x auto's candidates x (conv2d, Conv2dPlan) x {rounds} rounds")
            with tuning.override(fixed):
                per_case = [(case, auto.heuristic(case.p), auto.candidates(case.p)) for case in cases]
                algos = sorted({a for _, _, cands in per_case for a in cands})
                variants = {(a, prepared): (fixed, lambda case, a=a, prepared=prepared:
                                            case.runner(a, prepared) if a in auto.candidates(case.p) else None)
                            for a in algos for prepared in (False, True)}
                times = _sweep(variants, cases, rounds, budget_s)
            for i, (case, heuristic, cands) in enumerate(per_case):
                for prepared in (False, True):
                    measured = {a: times[a, prepared][i] for a in cands if i in times[a, prepared]}
                    best = min(measured, key=measured.get)
                    stored = best != heuristic and measured[best] < (1 - margin) * measured[heuristic]
                    key = tuning.problem_key(case.p, prepared)
                    report["layers"][key] = dict(label=case.label + (" plan" if prepared else ""), heuristic=heuristic,
                                                 best=best, stored=stored,
                                                 ms={a: round(t * 1e3, 4) for a, t in measured.items()},
                                                 gflops=round(case.flops / measured[best] / 1e9, 2))
                    if stored:
                        report["choices"][key] = best
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["tuned_knobs"] = dict(fixed)
    if write:
        machine = dict(cpu=bench._cpu_model(), isa=bench._isa_flags(), commit=bench._git_commit(),
                       created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        measurements = dict(machine=machine, knobs=report["knobs"], layers=report["layers"], threads=report["threads"],
                            seconds=report["seconds"])
        report["path"] = tuning.save(fixed, report["choices"], measurements, path=path)
    return report


def format_report(report):
    """The report as text: each knob's candidates (time relative to the default), then each
    layer's algorithms and what ``auto`` will run."""
    lines = ["knob                       default     chosen      layers  time vs default per value"]
    for name, k in report["knobs"].items():
        ratios = "  ".join(f"{_size(int(v))}:{r:.3f}" for v, r in k["ratios"].items())
        lines.append(f"{name:26s} {_size(k['default']):>10s}  {_size(k['chosen']):>10s}  {k['layers']:6d}  {ratios}")
    if report["layers"]:
        lines += ["", f"{'layer':44s} {'heuristic':10s} {'best':10s} {'stored':6s}  ms per algorithm"]
        for key, row in report["layers"].items():
            ms = "  ".join(f"{a}:{t:.3f}" for a, t in sorted(row["ms"].items()))
            lines.append(f"{row['label'][:44]:44s} {row['heuristic']:10s} {row['best']:10s} "
                         f"{'yes' if row['stored'] else '-':6s}  {ms}")
    lines.append("")
    lines.append(f"{len(report['choices'])} choice(s) and {len(report['tuned_knobs'])} knob(s) differ from the defaults "
                 f"({report['seconds']} s, {report['threads']} threads)")
    if report.get("path"):
        lines.append(f"wisdom written to {report['path']}")
    return "\n".join(lines)


def _size(v):
    if v >= 1 << 40:
        return "inf"
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if v >= 1 << shift and v % (1 << shift) == 0:
            return f"{v >> shift}{unit}"
    return str(v)
