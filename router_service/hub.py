"""Where `--model` points: a model directory, a Hugging Face Hub id (`ORG/NAME`, a snapshot directory in
the Hugging Face cache, through huggingface_hub: an HTTP client, so it lives at the edge, not in mesh/),
$MESH_MODEL, or the built-in model. Imported by the `mesh` commands that load a model (serve, generate)."""

from __future__ import annotations

import os
from pathlib import Path


def looks_like_hub_id(model: str) -> bool:
    """`org/name` (one slash, no leading dot or slash): a Hugging Face Hub id, unless such a directory exists."""
    parts = model.split("/")
    return (len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and not Path(model).exists())


def resolve_model(model: str | None, load_format: str = "auto", revision: str | None = None) -> Path:
    """--model DIR or a Hub id, else $MESH_MODEL, else the built-in model (mesh.cli.default_model_dir)."""
    from mesh.cli import default_model_dir
    model = model or os.environ.get("MESH_MODEL")
    if model:
        path = Path(model)
        if looks_like_hub_id(model):
            path = resolve_hub_model(model, revision, weights=load_format != "dummy")
        elif revision:
            raise SystemExit(f"mesh: error: --revision {revision}: applies to Hugging Face Hub ids, and "
                             f"--model {model} is a directory")
        if not (path / "config.json").is_file():
            raise SystemExit(f"mesh: error: --model {model}: no config.json there "
                             f"(create one with `mesh init-model --out {model}`)")
        if load_format != "dummy" and not any(path.glob("*.safetensors")):
            raise SystemExit(f"mesh: error: --model {model}: no *.safetensors weights there (a config-only "
                             f"model directory runs with --load-format dummy)")
        return path
    path = default_model_dir()
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise SystemExit(f"mesh: error: the built-in model is missing from this installation ({path}); reinstall "
                         f"moe-mesh, or pass --model")
    return path


def resolve_hub_model(repo_id: str, revision: str | None = None, weights: bool = True) -> Path:
    """A Hub model's snapshot directory through huggingface_hub: its cache (HF_HOME, HF_HUB_CACHE),
    HF_HUB_OFFLINE=1 (the cache only), and a token from HF_TOKEN or `hf auth login` for gated or
    private models. Downloads config, tokenizer and, with `weights`, the safetensors (nothing else)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise SystemExit(f"mesh: error: --model {repo_id}: Hub ids need the huggingface_hub package "
                         "(pip install huggingface_hub)") from None
    patterns = ["*.json", "*.jinja", "tokenizer*", "*.txt"] + (["*.safetensors"] if weights else [])
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except IncompleteSnapshotError as e:
        raise SystemExit(f"mesh: error: --model {repo_id}: {e}") from None
    except RevisionNotFoundError:
        raise SystemExit(f"mesh: error: --revision {revision}: no such branch, tag or commit of {repo_id}") from None
    except LocalEntryNotFoundError:
        raise SystemExit(f"mesh: error: --model {repo_id}: not in the Hugging Face cache"
                         f"{f' at revision {revision}' if revision else ''}, and it cannot be downloaded now "
                         "(HF_HUB_OFFLINE is set, or the Hub is unreachable)") from None
    except RepositoryNotFoundError:
        raise SystemExit(f"mesh: error: --model {repo_id}: no such model on the Hub, or it is private or gated "
                         "(set HF_TOKEN)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SystemExit(f"mesh: error: --model {repo_id}: {e}") from None
