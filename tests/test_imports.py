"""Layers you can see: the package's import graph, imports inside functions included, has no cycle, and its
sub-packages import only the layers below them (data flows one way: config → model + data → stages →
evaluation → rows → tables).

`python tests/test_imports.py` prints the graph's size, its cycles and its longest import chain.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "compress_order"


def modules(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted name → (file, is a package's __init__) of every module of the package."""
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package's modules it imports anywhere in its file (top level, functions, TYPE_CHECKING).
    `from pkg import name` counts as importing pkg.name where that is a module, else pkg."""
    mods = modules(package)

    def known(name: str) -> str | None:  # the module a dotted name lives in, if it is one of ours
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, (path, is_pkg) in mods.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            deps.update(d for d in map(known, names) if d is not None and d != mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            comp.append(v)
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest import chain of an acyclic graph: a module, one it imports, one that imports, ..."""

    @lru_cache(maxsize=None)
    def chain(v: str) -> tuple[str, ...]:
        return (v, *max((chain(w) for w in sorted(graph[v])), key=len, default=()))

    return list(max((chain(v) for v in sorted(graph)), key=len))


# Sub-packages from the bottom up; a module may import its own sub-package and those listed before it.
# Layers that share a number know nothing of each other.
LAYERS = {
    "core": 0,
    "numerics": 1,
    "loaders": 1,
    "modeling": 2,
    "stages": 3,
    "evaluation": 4,
    "analysis": 5,
    "export": 5,
    "config": 6,
    "run": 7,
    "cli": 8,
}


def layer_of(module: str) -> str | None:
    """The sub-package a module of the package lives in (None: the package's own __init__ / __main__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a module into a sub-package that is not below its own, as 'a → b'."""
    out = []
    for mod, deps in sorted(graph.items()):
        here = layer_of(mod)
        if here is None:
            continue
        for dep in sorted(deps):
            there = layer_of(dep)
            if there is not None and there != here and LAYERS[there] >= LAYERS[here]:
                out.append(f"{mod} ({here}) → {dep} ({there})")
    return out


def test_every_module_lives_in_a_layer():
    loose = [m for m in import_graph() if layer_of(m) is None and m.count(".") and not m.endswith("__main__")]
    assert not loose, f"modules outside the layers {sorted(LAYERS)}: {loose}"
    assert set(LAYERS) == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def test_a_lower_layer_never_imports_a_higher_one():
    found = upward_imports(import_graph())
    assert not found, "imports from a lower layer up (move the code down, or pass what it needs):\n" + "\n".join(found)


def test_only_the_configuration_edge_reads_the_raw_hydra_config():
    """Settings are typed once (config/settings.py): below config/ and cli/ no module imports omegaconf."""
    raw = []
    for mod, (path, _) in modules().items():
        if layer_of(mod) in ("config", "cli"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "omegaconf" for n in names):
                raw.append(f"{mod}: {', '.join(names)}")
    assert not raw, raw


def test_the_layer_check_sees_an_upward_import(tmp_path):
    pkg = tmp_path / "compress_order"
    for sub in ("core", "run"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("def f():\n    from compress_order.run.b import g\n")
    (pkg / "run" / "b.py").write_text("from compress_order.core import a\n")
    assert upward_imports(import_graph(pkg)) == ["compress_order.core.a (core) → compress_order.run.b (run)"]


def test_the_package_has_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles (imports inside functions count too):\n" + "\n".join(
        " ↔ ".join(c) for c in found
    )


def test_the_graph_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text("from . import a\n\ndef g():\n    pass\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


if __name__ == "__main__":
    g = import_graph()
    found = cycles(g)
    up = upward_imports(g)
    print(f"{len(g)} modules, {sum(map(len, g.values()))} imports, {len(found)} cycle(s), {len(up)} upward import(s)")
    for u in up:
        print("  upward:", u)
    for c in found:
        print("  cycle:", ", ".join(c))
    if not found:
        chain = longest_chain(g)
        print(f"longest chain ({len(chain)} modules): {' → '.join(chain)}")


def test_a_refused_config_is_refused_before_torch_is_imported():
    """The checks that need no model need no torch either: `run bits=1` answers from the configuration edge
    (a start-up measured in tenths of a second, not the seconds torch and transformers take to import)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from compress_order.cli.main import main\n"
        "try:\n"
        "    main(['run', 'bits=1'])\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        "print('torch imported:', 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "bits=1 is outside 2-8" in out.stderr, out.stderr
    assert "torch imported: False False" in out.stdout, out.stdout


def test_list_imports_neither_torch_nor_transformers():
    """`compress-order list` reads the stages' defaults from their source (config/stages.declared_defaults) and
    the backends from their table, so it starts in tenths of a second."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from compress_order.cli.main import main\n"
        "assert main(['list']) == 0\n"
        "print('torch imported:', 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "stage:" in out.stdout and "torch imported: False False" in out.stdout, out.stdout + out.stderr
