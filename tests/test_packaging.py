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


def test_the_core_imports_no_rpc_cache_or_http_library():
    """mesh/ (the engine, the CLI's flags) and the `mesh` command's parser (mesh_cli, all commands) load
    none of the edge's libraries: grpc, ray, redis, the HTTP server and clients, huggingface_hub. The
    edge imports them when a command needs them."""
    import subprocess
    import sys
    code = ("import sys, mesh.engine.engine, mesh.cli, mesh_cli; mesh_cli.build_parser(); "
            "edge = {'grpc', 'ray', 'redis', 'starlette', 'uvicorn', 'httpx', 'httpx2', 'huggingface_hub', 'openai'}; "
            "print(sorted(edge & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_mesh_command_is_the_composing_package():
    """The console script `mesh` runs mesh_cli.main, the one module that imports both core and edge."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"mesh": "mesh_cli:main"}
    import mesh_cli
    assert {"init-model", "generate", "serve", "loadtest", "plan"} <= set(
        mesh_cli.build_parser()._subparsers._group_actions[0].choices)
