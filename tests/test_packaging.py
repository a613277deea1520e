"""What an installed wheel needs beside the Python modules: the CPU backend's C/C++ sources (compiled
on first use) must all be package data, or a wheel install fails to build its kernels."""

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_kernel_source_is_package_data():
    from mesh.model.cpu import native
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mesh"]
    csrc = ROOT / "mesh" / "model" / "cpu" / "csrc"
    files = sorted(p for p in csrc.iterdir() if p.is_file())
    assert {p.name for p in files} >= {p.name for p in native._SRCS + native._CXX_SRCS + native._HEADERS}
    for p in files:
        rel = p.relative_to(ROOT / "mesh").as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not package data: a wheel would lack it"
