"""Every name a script under scripts/ imports from the package exists: a move inside compress_order/ that a script
was not told about fails here, not the first time someone runs the benchmark."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


def package_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) for each `from compress_order... import name` and `import compress_order...`, at any
    depth (functions included) and inside the scripts' code strings run in subprocesses. An import in an
    `except ImportError:` handler is a fallback for an older checkout (`bench_stages.py --src`), not checked."""
    found = []

    def fallbacks(tree: ast.AST) -> set[int]:
        def catches_import_error(h: ast.ExceptHandler) -> bool:
            names = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
            return any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names)

        return {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.Try)
            for h in node.handlers
            if catches_import_error(h)
            for inner in ast.walk(h)
        }

    def walk(tree: ast.AST, offset: int = 0) -> None:
        skip = fallbacks(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compress_order"):
                found.extend((offset + node.lineno, node.module, a.name) for a in node.names)
            elif isinstance(node, ast.Import):
                found.extend(
                    (offset + node.lineno, a.name, None) for a in node.names if a.name.startswith("compress_order")
                )
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "compress_order" in node.value:
                try:  # a code string the script hands to a fresh interpreter
                    walk(ast.parse(node.value), node.lineno - 1)
                except SyntaxError:
                    pass

    walk(ast.parse(path.read_text(), str(path)))
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_imports_resolve(script):
    missing = []
    for line, module, name in package_imports(script):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{script.name}:{line}: {module} ({e})")
            continue
        if name is not None and name != "*" and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")  # a sub-module
            except ImportError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def test_the_walk_finds_code_strings():
    """The check above is only as good as its walk: it sees the sweep subprocess's code in bench_memory."""
    found = package_imports(Path(__file__).resolve().parents[1] / "scripts" / "bench_memory.py")
    assert ("compress_order.cli.main", "entry") in {(m, n) for _, m, n in found}


def test_fallback_imports_for_older_checkouts_are_not_checked(tmp_path):
    script = tmp_path / "s.py"
    script.write_text(
        "try:\n    from compress_order.a import new\nexcept ImportError:\n    from compress_order.b import old\n"
    )
    assert [(m, n) for _, m, n in package_imports(script)] == [("compress_order.a", "new")]
