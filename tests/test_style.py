"""The package keeps one layout: `ruff format` (line length 120, pyproject.toml) and sorted imports, so no
`# fmt: skip` markers are needed and a diff shows only what changed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.fixture(scope="module", autouse=True)
def _needs_ruff():
    if _ruff("--version").returncode != 0 and shutil.which("ruff") is None:
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")


def test_the_package_is_formatted():
    out = _ruff("format", "--check", "compress_order")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_package_imports_are_sorted_and_no_format_marker_is_left():
    out = _ruff("check", "--select", "I,F401,F821", "compress_order")
    assert out.returncode == 0, out.stdout + out.stderr
    marked = [str(p.relative_to(ROOT)) for p in (ROOT / "compress_order").rglob("*.py") if "fmt: skip" in p.read_text()]
    assert not marked, marked
