"""The packages' layering, read from the source: every import of every module (top-level and inside
functions, absolute and relative) is checked against the layers below, so an upward import or an
import circle between the core and the edge fails here rather than in review.

    mesh_cli                      the `mesh` command: composes core and edge (nothing imports it)
    router_service, expert_workers   the edge; expert workers do not import the gateway
    mesh                          the core: never imports the edge

Inside mesh, a subpackage imports only its own modules and those of lower layers (LAYERS)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mesh", "router_service", "expert_workers", "mesh_cli")

# mesh's parts, lowest first; a part imports only parts of a strictly lower layer (and itself).
LAYERS = [
    {"types", "config"},
    {"tokenizer", "telemetry", "model", "cache"},  # model below parallel and engine; cache below engine
    {"parallel", "presets"},
    {"engine", "plan"},
    {"cli"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}
# What each top-level package may import of the others'.
ALLOWED = {
    "mesh": {"mesh"},
    "expert_workers": {"mesh", "expert_workers"},
    "router_service": {"mesh", "expert_workers", "router_service"},
    "mesh_cli": {"mesh", "router_service", "mesh_cli"},
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in the file, at any depth. `from pkg import name`
    counts as importing pkg.name (a submodule, or an attribute of pkg: both are pkg's layer or below)."""
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def violations(root: Path) -> list[str]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            mod = module_name(path, root)
            for line, target in imports_of(path, root):
                top = target.split(".")[0]
                if top not in ALLOWED:
                    continue  # the standard library or a third-party package
                where = f"{path.relative_to(root)}:{line}: {mod} imports {target}"
                if top not in ALLOWED[pkg]:
                    out.append(f"{where}: {pkg} may import only {sorted(ALLOWED[pkg])}")
                    continue
                if pkg == top == "mesh":
                    src, dst = mod.split(".")[1:2], target.split(".")[1:2]
                    if not src or not dst or src == dst:
                        continue  # mesh/__init__, `import mesh`, or within one part
                    for part in (src[0], dst[0]):
                        assert part in RANK, f"mesh.{part} is in no layer of tests/test_layering.py: add it"
                    if RANK[dst[0]] >= RANK[src[0]]:
                        out.append(f"{where}: mesh.{src[0]} (layer {RANK[src[0]]}) may not import mesh.{dst[0]} "
                                   f"(layer {RANK[dst[0]]})")
    return out


def test_no_upward_import_and_no_circle():
    found = violations(ROOT)
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_every_part_of_mesh_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in (ROOT / "mesh").iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert parts == set(RANK), f"parts without a layer: {parts - set(RANK)}; stale layers: {set(RANK) - parts}"


@pytest.mark.parametrize("planted, expected", [
    ("mesh/model/x.py", ("from mesh.engine import engine\n", "mesh.model (layer 1) may not import mesh.engine")),
    ("mesh/cache/x.py", ("def f():\n    from ..engine.block_manager import BlockManager\n",
                         "mesh.cache (layer 1) may not import mesh.engine")),
    ("mesh/engine/x.py", ("def f():\n    import router_service.server\n", "mesh may import only ['mesh']")),
    ("mesh/x.py", ("from mesh_cli import main\n", "mesh may import only ['mesh']")),
    ("expert_workers/x.py", ("from router_service import hub\n", "expert_workers may import only")),
    ("router_service/x.py", ("import mesh_cli\n", "router_service may import only")),
])
def test_a_planted_violation_is_caught(tmp_path, planted, expected):
    """The checker on a copy of the layout with one bad import planted (module level or in a function)."""
    source, message = expected
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / planted).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / planted).write_text(source)
    found = violations(tmp_path)
    assert len(found) == 1 and message in found[0], found
