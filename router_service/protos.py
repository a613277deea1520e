"""Python stubs for protos/mesh/v1/*.proto, generated with grpcio-tools into router_service/gen/.

The generated tree is a build product (git-ignored, never edited by hand). It is rebuilt when it is
missing, or when the .proto files or the grpcio-tools version changed since it was built (a stamp
holds a hash of both: file mtimes are unreliable after a git checkout). Importing this module builds
it if needed, so a fresh checkout works without a build step; `python -m router_service.protos`
rebuilds it explicitly (the install script calls that).

Layout: protoc names modules after the proto path, `mesh/v1/inference_pb2.py`, and the gRPC stub
imports `from mesh.v1 import inference_pb2`. That would resolve to this project's own `mesh`
package, so the tree is generated as the package `router_service.gen.mesh.v1` and those imports are
rewritten to relative ones. The proto file names registered in the descriptor pool stay
`mesh/v1/*.proto`, which is what server reflection shows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
GEN = Path(__file__).resolve().parent / "gen"
STAMP = GEN / ".stamp"
PACKAGES = ("mesh/v1",)


def proto_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (PROTO_ROOT / pkg).glob("*.proto"))


def _fingerprint() -> str:
    import grpc_tools
    from importlib.metadata import version
    h = hashlib.sha256(f"grpcio-tools {version('grpcio-tools')} {grpc_tools.__file__}\n".encode())
    for p in proto_files():
        h.update(p.relative_to(PROTO_ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def is_current() -> bool:
    try:
        return STAMP.read_text().strip() == _fingerprint()
    except OSError:
        return False


def _rewrite_imports(path: Path) -> None:
    # `from mesh.v1 import x_pb2 as y` -> `from . import x_pb2 as y` (same package: see the docstring)
    text = path.read_text()
    for pkg in PACKAGES:
        dotted = pkg.replace("/", ".")
        text = re.sub(rf"^from {re.escape(dotted)} import ", "from . import ", text, flags=re.M)
    path.write_text(text)


def generate() -> Path:
    """Build router_service/gen/ from protos/ (into a temporary directory, then swapped in, so a
    concurrent importer never sees a half-written tree)."""
    from grpc_tools import protoc
    files = proto_files()
    if not files:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT}")
    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=GEN.parent))
    try:
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={tmp}",
                f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *map(str, files)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(map(str, files))}")
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            (d / "__init__.py").touch()
        for f in tmp.rglob("*_pb2_grpc.py"):
            _rewrite_imports(f)
        (tmp / "__init__.py").write_text('"""Generated from protos/ by router_service.protos; do not edit."""\n')
        (tmp / ".stamp").write_text(_fingerprint() + "\n")
        old = GEN.with_name(f".gen-old-{os.getpid()}")
        if GEN.exists():
            os.replace(GEN, old)
        try:
            os.replace(tmp, GEN)
        except OSError:
            if not GEN.exists():  # another process swapped its own (identical) tree in first
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return GEN


def ensure() -> None:
    # An installed copy without protos/ (a wheel, an image) uses the tree built before packaging; so
    # does a runtime without grpcio-tools (a build-time tool) that was given a built tree.
    if STAMP.is_file() and (not PROTO_ROOT.is_dir() or importlib.util.find_spec("grpc_tools") is None):
        return
    if not is_current():
        generate()


ensure()
from router_service.gen.mesh.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc  # noqa: E402

__all__ = ["admin_pb2", "admin_pb2_grpc", "inference_pb2", "inference_pb2_grpc", "generate", "ensure",
           "is_current"]


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        sys.exit(0 if is_current() else 1)
    print(f"generated {generate()}")
