"""The package users install by name (issue 29 item 5): `bsr-vit` (`bsr` on PyPI is another project) builds as a wheel
and an sdist, and the wheel, installed into a fresh environment, carries everything a run needs: `bsr --version`
and a short `bsr train --recipe micro` from the shipped assets, run from outside the source tree."""

from __future__ import annotations

import site
import subprocess
import sys
from pathlib import Path

import pytest

from bsr.version import __version__

ROOT = Path(__file__).resolve().parent.parent


def run(argv, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def test_the_wheel_installs_by_name_and_trains_from_its_own_files(tmp_path):
    pytest.importorskip("build", reason="the build package is not installed (pip install build)")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, ROOT])
    wheel, sdist = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
    assert [w.name for w in wheel] == [f"bsr_vit-{__version__}-py3-none-any.whl"]
    assert [s.name for s in sdist] == [f"bsr_vit-{__version__}.tar.gz"]

    # a fresh environment whose only bsr is the wheel's; the heavy dependencies (torch, timm...) come from this one
    env = tmp_path / "env"
    run([sys.executable, "-m", "venv", env])
    fresh = next((env / "lib").glob("python*/site-packages"))
    (fresh / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run([env / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", wheel[0]])
    where = run([env / "bin" / "python", "-c", "import bsr, bsr_device; print(bsr.__file__, bsr_device.__file__)"],
                cwd=tmp_path).stdout
    assert all(str(fresh) in path for path in where.split()), where
    assert run([env / "bin" / "bsr", "--version"], cwd=tmp_path).stdout.strip() == f"bsr {__version__}"
    out = run([env / "bin" / "bsr", "train", "--recipe", "micro", "--steps", "3", "--eval-every", "3", "--limit", "64",
               "--threads", "1", "--no-progress", "--out", tmp_path / "run"], cwd=tmp_path).stdout
    assert "method bsr on digits-embedded" in out and (tmp_path / "run" / "checkpoint.safetensors").is_file()
    assert run([env / "bin" / "bsr-device", "--help"], cwd=tmp_path).stdout.startswith("usage: bsr-device")
