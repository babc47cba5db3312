"""The layout keeps its shape (docs/ARCHITECTURE.md): imports go downward only, no cycles, no module over 450 lines."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "check_imports.py"
MAX_LINES = 450


def run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), "--root", str(root)], capture_output=True, text=True,
                          timeout=120)


def test_imports_go_downward_without_cycles():
    result = run_check(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no cycles, no upward imports" in result.stdout


@pytest.mark.parametrize("files, expected", [
    ({"core/a.py": "def f():\n    from ..train import b\n", "train/b.py": ""},
     "upward import: bsr.core.a (core) imports bsr.train.b (train)"),
    ({"train/a.py": "from . import b\n", "train/b.py": "from .a import x\n"},
     "module cycle: bsr.train.a -> bsr.train.b"),
    ({"gadgets/__init__.py": "", "gadgets/a.py": "from ..errors import E\n"}, "package 'gadgets' has no layer"),
    ({"../bsr_device/__init__.py": "", "../bsr_device/a.py": "def f():\n    import torch\n"},
     "forbidden import: bsr_device.a (device) imports torch"),
    ({"../bsr_device/__init__.py": "", "../bsr_device/a.py": "from bsr.core import x\n", "core/x.py": ""},
     "upward import: bsr_device.a (device) imports bsr.core.x (core)"),
])
def test_the_check_finds_violations(tmp_path, files, expected):
    """A lazy upward import, a cycle inside a package, and a package placed in no layer are each caught."""
    for name, text in {"__init__.py": "", "errors.py": "", "core/__init__.py": "", "train/__init__.py": "",
                       **files}.items():
        path = tmp_path / "bsr" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    result = run_check(tmp_path)
    assert result.returncode == 1 and expected in result.stdout, result.stdout


def test_no_module_is_over_450_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for package in ("bsr", "bsr_device") for p in (ROOT / package).rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MAX_LINES} == {}
