"""The repository's documents stand alone: no file points at plans or notes outside the repository,
and every relative link in a Markdown file resolves to a file inside it."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"DESIGN\.md|MODELS\.md|\.\./shared|/work/")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    files = out.stdout.split() if out.returncode == 0 else [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")]
    return [ROOT / f for f in files if f.endswith((".md", ".py", ".sh", ".toml", ".proto", ".yaml", ".yml", ".conf"))
            and (ROOT / f).is_file()]


def test_no_file_points_outside_the_repository():
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in _tracked()
                 if p.name != "test_docs.py" for m in [OUTSIDE.search(p.read_text(errors="replace"))] if m]
    assert not offenders, offenders


def test_markdown_links_resolve_inside_the_repository():
    broken = []
    for md in (p for p in _tracked() if p.suffix == ".md"):
        for target in LINK.findall(md.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (md.parent / target).resolve()
            if not path.exists() or ROOT not in path.parents and path != ROOT:
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    assert not broken, broken
