"""The tree is the architecture: no import cycles, and each package imports only what its
``__init__`` docstring allows (read from the source, so the test needs no kernel compiled)."""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "numbaconv"

#: the front door and what every path shares (issue: at most 14 modules at the top level)
TOP_LEVEL = {"__init__", "__main__", "_version", "ahead", "api", "auto", "cache", "dask", "layout", "padding", "plan",
             "problem", "registry", "tuning"}

#: importer (module or package prefix) -> the numbaconv modules / packages it may import.
#: The most specific key applies.  ``numbaconv`` alone means the public package itself.
ALLOWED = {
    "numbaconv": {"numbaconv.api", "numbaconv.layout", "numbaconv.registry", "numbaconv.auto", "numbaconv.problem",
                  "numbaconv.plan", "numbaconv._version"},
    "numbaconv._version": set(),
    "numbaconv.__main__": {"numbaconv.bench"},
    "numbaconv.layout": set(),
    "numbaconv.problem": {"numbaconv.layout"},
    "numbaconv.registry": set(),
    "numbaconv.auto": {"numbaconv.registry", "numbaconv.tuning"},
    "numbaconv.tuning": {"numbaconv.cpu._vec", "numbaconv._version"},
    "numbaconv.cache": {"numbaconv", "numbaconv.registry"},
    "numbaconv.ahead": {"numbaconv", "numbaconv.cpu._launch", "numbaconv.cpu.tiled", "numbaconv.auto",
                        "numbaconv.problem"},
    "numbaconv.padding": {"numbaconv.cpu._jit", "numbaconv.cpu._launch", "numbaconv.cpu._wcache"},
    "numbaconv.plan": {"numbaconv.api", "numbaconv.auto", "numbaconv.layout", "numbaconv.problem",
                       "numbaconv.registry", "numbaconv.cpu._wcache", "numbaconv.cpu.epilogue"},
    "numbaconv.api": {"numbaconv.cpu.epilogue", "numbaconv.cpu._wcache", "numbaconv.auto", "numbaconv.layout", "numbaconv.padding",
                      "numbaconv.problem", "numbaconv.registry"},
    "numbaconv.cpu._jit": {"numbaconv.cpu._vec"},  # (its copy helpers are explicit-vector intrinsics)
    "numbaconv.cpu._vec": set(),
    "numbaconv.cpu._launch": {"numbaconv.cpu._jit"},
    "numbaconv.cpu": {"numbaconv.cpu", "numbaconv.problem", "numbaconv.layout", "numbaconv.tuning"},
    "numbaconv.grad": {"numbaconv.grad", "numbaconv.cpu", "numbaconv.api", "numbaconv.auto", "numbaconv.problem",
                       "numbaconv.layout", "numbaconv.padding", "numbaconv.registry", "numbaconv.cuda.backward"},
    "numbaconv.cuda": {"numbaconv.cuda", "numbaconv.problem", "numbaconv.layout"},
    "numbaconv.bench": {"numbaconv", "numbaconv.bench", "numbaconv.cache", "numbaconv.cuda.conv", "numbaconv.cpu.peak",
                        "numbaconv.cpu._vec", "numbaconv.torch",
                        "numbaconv.tuning", "numbaconv.auto", "numbaconv.api", "numbaconv.problem",
                        "numbaconv.registry"},
    "numbaconv.dask": {"numbaconv", "numbaconv.problem"},
    "numbaconv.torch": {"numbaconv", "numbaconv.torch", "numbaconv.ahead", "numbaconv.cuda.backward",
                        "numbaconv.problem", "numbaconv.cpu.pool"},
}


def _module_name(path):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


MODULES = _modules()


def _resolve(importer, path, level, module):
    """Absolute name of ``from <level dots><module> import ...`` inside ``importer``."""
    if level == 0:
        return module
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{module}" if module else package


def imports(name):
    """numbaconv modules that module ``name`` imports anywhere (top level or inside functions)."""
    path = MODULES[name]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, path, node.level, node.module)
            # ``from pkg import mod`` imports the submodule when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "numbaconv" or t.startswith("numbaconv."))
    found.discard(name)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def _allowed_for(name):
    key = max((k for k in ALLOWED if name == k or name.startswith(k + ".")), key=len)
    return ALLOWED[key]


def _within(target, allowed):
    return any(target == a or target.startswith(a + ".") for a in allowed)


def test_top_level_holds_only_the_core():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top == TOP_LEVEL, sorted(top ^ TOP_LEVEL)
    assert len(top) <= 14
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == {"cpu", "grad", "cuda", "bench", "torch"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layering(name):
    allowed = _allowed_for(name)
    bad = sorted(t for t in GRAPH[name] if not _within(t, allowed))
    assert not bad, f"{name} may not import {bad} (allowed: {sorted(allowed)})"


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph: all of size one."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            w = w if w in MODULES else next((m for m in MODULES if w.startswith(m + ".")), None)
            if w is None:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_cycle_detector_sees_a_cycle(monkeypatch):
    """The detector itself: a two-module cycle planted into the graph is reported."""
    monkeypatch.setitem(GRAPH, "numbaconv.layout", GRAPH["numbaconv.layout"] | {"numbaconv.problem"})
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()


@pytest.mark.parametrize("package", ["cpu", "grad", "cuda", "bench", "torch"])
def test_each_package_says_what_lives_there_and_what_it_may_import(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
    assert doc and "May import" in doc
    for module in (ROOT / package).glob("*.py"):
        if module.stem != "__init__" and not module.stem.startswith("_"):
            assert f"``{module.stem}``" in doc, f"numbaconv/{package}/__init__.py does not describe {module.stem}"


def test_import_numbaconv_stays_light():
    """``import numbaconv`` loads neither torch nor numba.cuda nor the training, CUDA or bench packages."""
    code = ("import sys, numbaconv; heavy = [m for m in ('torch', 'numba.cuda', 'numbaconv.grad.backward', "
            "'numbaconv.cuda.conv', 'numbaconv.bench.suite') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_readme_architecture_matches_the_tree():
    """Every module in ``numbaconv/`` is in the README's drawing, at its place, and nothing else."""
    import re

    readme = (ROOT.parent / "README.md").read_text()
    section = readme.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    drawn, package = set(), None
    for line in block.splitlines():
        m = re.match(r"^( +)(\S.*)$", line)
        if not m:
            continue
        indent, text = len(m.group(1)), m.group(2)
        names = re.match(r"^((?:[\w.]+\.py|\w+/)(?:, [\w.]+\.py)*)", text)
        if names is None:
            continue
        for name in names.group(1).split(", "):
            if name.endswith("/"):
                package = name[:-1]
                drawn.add(package + "/__init__.py")
            elif indent == 2:
                drawn.add(name)
            elif indent == 4 and package:
                drawn.add(f"{package}/{name}")
    tree = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py")} - {"__main__.py"}
    assert drawn == tree, f"missing from README: {sorted(tree - drawn)}; not in the tree: {sorted(drawn - tree)}"
