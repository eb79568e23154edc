"""No import cycles inside distill_d2, the ground floor imports nothing of it, every module imports alone.

The graph is read from the source (AST), not from an interpreter: every ``import`` of a distill_d2
module counts, top-level and function-local alike (a function-local import only hides a cycle until
the function runs), relative imports resolved:

* ``from . import x`` / ``from .pkg import x``: ``pkg.x`` when that is a module, else ``pkg`` (its
  ``__init__``); ``from .pkg import x`` counts ``pkg`` too;
* a package ``__init__`` importing its submodules in a loop (``importlib.import_module(f"{__name__}.{m}")``,
  as ``distill_d2/methods/__init__.py`` does) imports every submodule of the package.

A package's ``__init__`` importing its own submodules is an edge like any other: it closes a cycle only
together with a submodule that imports the package (``from .. import x`` of a name defined there).
"""
import ast
import importlib.util
import os
import pkgutil
import subprocess
import sys
import textwrap
import time
from collections import defaultdict, deque

PKG = "distill_d2"
GROUND_FLOOR = ("distill_d2.errors", "distill_d2.registry")


def package_modules():
    """{dotted module name: (file path, is a package __init__)} of every module of distill_d2, found with
    pkgutil over the package path (nothing is imported)."""
    root = importlib.util.find_spec(PKG).submodule_search_locations[0]
    out = {PKG: (os.path.join(root, "__init__.py"), True)}
    todo = [(PKG, root)]
    while todo:
        name, path = todo.pop()
        for info in pkgutil.iter_modules([path]):
            full = f"{name}.{info.name}"
            if info.ispkg:
                sub = os.path.join(path, info.name)
                out[full] = (os.path.join(sub, "__init__.py"), True)
                todo.append((full, sub))
            else:
                out[full] = (os.path.join(path, info.name + ".py"), False)
    return out


class _Imports(ast.NodeVisitor):
    """Every import of a module's AST with its line and enclosing function (None: module level)."""

    def __init__(self):
        self.found, self._func = [], []  # (node, line, function or None)

    def _scope(self, node):
        self._func.append(node.name)
        self.generic_visit(node)
        self._func.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = _scope

    def _add(self, node):
        self.found.append((node, node.lineno, ".".join(self._func) or None))
        self.generic_visit(node)

    visit_Import = visit_ImportFrom = visit_Call = _add


def _dynamic_targets(call, name, is_pkg, modules):
    """Modules an ``import_module(...)`` call imports: a constant name, or ``f"{__name__}.{x}"`` in a
    package ``__init__`` (= each of its direct submodules)."""
    f = call.func
    if not (isinstance(f, ast.Attribute) and f.attr == "import_module"
            or isinstance(f, ast.Name) and f.id == "import_module") or not call.args:
        return []
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value] if arg.value.startswith(PKG) else []
    if (is_pkg and isinstance(arg, ast.JoinedStr) and len(arg.values) >= 2
            and isinstance(arg.values[0], ast.FormattedValue) and isinstance(arg.values[0].value, ast.Name)
            and arg.values[0].value.id == "__name__"
            and isinstance(arg.values[1], ast.Constant) and arg.values[1].value == "."):
        return sorted(m for m in modules if m.rpartition(".")[0] == name)
    return []


def import_graph():
    """({module: {imported distill_d2 module: [(line, function or None), ...]}}, {module: file}, the
    third-party modules imported at module level)."""
    modules = package_modules()
    graph, third_party = {}, set()
    for name, (path, is_pkg) in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        package = name if is_pkg else name.rpartition(".")[0]
        edges = defaultdict(list)
        visitor = _Imports()
        visitor.visit(tree)
        for node, line, func in visitor.found:
            targets = []
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PKG:
                        targets.append(alias.name)
                    elif func is None:
                        third_party.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - (node.level - 1)])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module
                    if base.split(".")[0] != PKG:
                        if func is None:
                            third_party.add(base)
                        continue
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets += subs
                if node.module or len(subs) < len(node.names):  # a name defined in base itself
                    targets.append(base)
            else:
                targets = _dynamic_targets(node, name, is_pkg, modules)
            for t in targets:
                if t != name:
                    edges[t].append((line, func))
        graph[name] = dict(edges)
    return graph, {n: p for n, (p, _) in modules.items()}, third_party


def strongly_connected(graph):
    """Tarjan's strongly connected components of ``graph`` ({node: iterable of nodes}), iteratively."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    out.append(comp)
    return out


def cycles(graph):
    """One shortest cycle through each module that lies on a cycle, deduplicated: [[a, b, ..., a], ...]."""
    found = set()
    for comp in strongly_connected(graph):
        if len(comp) < 2:
            continue
        for start in sorted(comp):
            prev, todo = {start: None}, deque([start])
            while todo:  # BFS inside the component back to start
                v = todo.popleft()
                if start in graph[v] and v in prev:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    path = path[::-1]  # start .. v
                    i = path.index(min(path))
                    found.add(tuple(path[i:] + path[:i]))
                    break
                for w in sorted(graph[v]):
                    if w in comp and w not in prev:
                        prev[w] = v
                        todo.append(w)
    return [list(c) + [c[0]] for c in sorted(found, key=lambda c: (len(c), c))]


def _where(graph, files, a, b):
    short = os.path.relpath(files[a], os.path.dirname(os.path.dirname(files[PKG])))
    return f"{short}:" + ", ".join(f"{line}" + (f" (in {func})" if func else "") for line, func in graph[a][b])


def test_no_import_cycles():
    graph, files, _ = import_graph()
    assert len(graph) > 30 and "distill_d2.data.own" in graph  # (the walk found the package)
    found = cycles(graph)
    report = []
    for c in found:
        report.append(" -> ".join(c))
        report += [f"    {a} -> {b}: {_where(graph, files, a, b)}" for a, b in zip(c, c[1:])]
    assert not found, f"{len(found)} import cycle(s) in distill_d2 (function-local imports count):\n" + "\n".join(report)


def test_cycle_finder_on_a_hand_made_graph():
    g = {"a": {"b": 1}, "b": {"c": 1, "a": 1}, "c": {"a": 1}, "d": {"a": 1}, "e": {"e": 1}}
    assert cycles(g) == [["a", "b", "a"], ["a", "b", "c", "a"]]
    assert sorted(map(sorted, strongly_connected(g))) == [["a", "b", "c"], ["d"], ["e"]]


def test_relative_imports_are_resolved():
    graph, _, _ = import_graph()
    # `from ..errors import DistillConfigError` in a subpackage; `from .own import x` / `from . import methods`
    assert "distill_d2.errors" in graph["distill_d2.data.own"]
    assert {"distill_d2.data", "distill_d2.modeling", "distill_d2.methods"} <= set(graph["distill_d2"])
    # the loop of importlib.import_module in methods/__init__.py imports each method file
    assert "distill_d2.methods.tar" in graph["distill_d2.methods"]
    stale = [f"{a} imports {b}" for a in graph for b in graph[a] if b not in graph]
    assert not stale, f"imports of modules that do not exist: {stale}"


def test_ground_floor_imports_nothing_of_distill_d2():
    graph, files, _ = import_graph()
    for m in GROUND_FLOOR:
        assert not graph[m], f"{m} must import nothing of distill_d2, imports: " + "; ".join(
            f"{b} ({_where(graph, files, m, b)})" for b in graph[m])


IMPORT_EACH = textwrap.dedent("""
    import importlib, os, sys, time, traceback
    third_party, modules = sys.argv[1].split(","), sys.argv[2].split(",")
    for name in third_party:  # (only to make each fork cheap; whatever fails here is imported by the module)
        try:
            importlib.import_module(name)
        except Exception:
            pass
    assert not any(m.split(".")[0] == "distill_d2" for m in sys.modules), "distill_d2 imported too early"
    failed = []
    for m in modules:  # each module first, in a fresh copy of this interpreter
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(m)
            except BaseException:
                print(f"--- import {m} (first) failed:"); traceback.print_exc(file=sys.stdout); sys.stdout.flush()
                os._exit(1)
            os._exit(0)
        if os.waitpid(pid, 0)[1]:
            failed.append(m + " (first)")
    for m in modules:  # then all of them in one interpreter, in sorted order
        try:
            importlib.import_module(m)
        except BaseException:
            print(f"--- import {m} (after the ones before it) failed:"); traceback.print_exc(file=sys.stdout)
            failed.append(m + " (in order)")
    print("FAILED:", ", ".join(failed) if failed else "none")
    sys.exit(1 if failed else 0)
""")


def test_every_module_imports_first_and_in_order():
    """Each module imported first in a fresh interpreter (a fork of one that pre-imported the third-party
    libraries distill_d2 imports at module level: torch and detectron2 take ~5 s per interpreter here),
    then all in one interpreter in sorted order."""
    graph, _, third_party = import_graph()
    modules = sorted(graph)
    t = time.time()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if hasattr(os, "fork"):
        r = subprocess.run([sys.executable, "-c", IMPORT_EACH, ",".join(sorted(third_party)), ",".join(modules)],
                           capture_output=True, text=True, env=env, timeout=600)
        rc, out = r.returncode, r.stdout + r.stderr[-3000:]
    else:  # no fork: a fresh interpreter per module
        rc, out = 0, ""
        for m in modules:
            r = subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True, text=True, env=env)
            rc, out = rc or r.returncode, out + (f"--- import {m} failed:\n{r.stderr[-3000:]}" if r.returncode else "")
    print(f"{len(modules)} modules imported first and in order in {time.time() - t:.1f} s")
    assert rc == 0, out
