"""Hugging Face Hub ids as models: `--model ORG/NAME` becomes a snapshot directory in the Hugging Face
cache, through huggingface_hub (an HTTP client, so it lives at the edge, not in mesh/)."""

from __future__ import annotations

from pathlib import Path


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
