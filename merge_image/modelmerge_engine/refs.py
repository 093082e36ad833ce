"""Model references: a local directory, or a Hugging Face repo id ("org/name" or "org/name@revision")
resolved through huggingface_hub's standard cache (HF_HOME), token (HF_TOKEN) and offline mode
(HF_HUB_OFFLINE=1). Weights are never loaded through a model class, so no remote code ever runs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from modelmerge_engine.errors import MergeError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a merge needs from a repo: weights, configs, tokenizer and generation files, the license.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "LICENSE*"]


@dataclass(frozen=True)
class ResolvedModel:
    ref: str
    path: Path
    source: str  # "local" | "huggingface"
    revision: str | None = None  # the commit a repo id resolved to

    def describe(self) -> dict[str, str | None]:
        return {"ref": self.ref, "source": self.source, "path": str(self.path), "revision": self.revision}


def resolve(ref: str, field: str) -> ResolvedModel:
    """Find the model `ref`; `field` names the request field for error messages."""
    path = Path(ref).expanduser()
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise MergeError(f"{field}: directory {ref} is not readable")
        return ResolvedModel(ref, path.resolve(), "local")
    repo_id, _, revision = ref.partition("@")
    if not _REPO_ID.match(repo_id) or ref.startswith(("/", ".", "~")):
        raise MergeError(f"{field}: {ref} is neither an existing directory nor a Hugging Face repo id")
    return _from_hub(ref, repo_id, revision or None, field)


def _from_hub(ref: str, repo_id: str, revision: str | None, field: str) -> ResolvedModel:
    folder = hub_snapshot(repo_id, revision, field=field, allow_patterns=ALLOW_PATTERNS)
    return ResolvedModel(ref, folder, "huggingface", revision=folder.name)


def hub_snapshot(repo_id: str, revision: str | None, *, field: str, allow_patterns: list[str],
                 repo_type: str = "model") -> Path:
    """The cached snapshot folder of a Hub repo (a model's, or a dataset's), fetched when missing and allowed;
    errors name `field` and never show the token."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kind = "Hugging Face repo" if repo_type == "model" else f"Hugging Face {repo_type}"
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns,
                                      token=os.environ.get("HF_TOKEN") or None))
    except RevisionNotFoundError:
        raise MergeError(f"{field}: revision {revision!r} of {repo_id} not found") from None
    except GatedRepoError:
        raise MergeError(f"{field}: {repo_id} is gated; set HF_TOKEN to a token with access") from None
    except RepositoryNotFoundError:
        raise MergeError(f"{field}: {kind} {repo_id} not found (or private without a token)") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the cache" if offline else \
            "it is not in the cache and the Hub could not be reached"
        raise MergeError(f"{field}: cannot load {repo_id}: {why} "
                         f"(cache: {os.environ.get('HF_HOME', '~/.cache/huggingface')})") from None
    except (HfHubHTTPError, OSError) as exc:
        raise MergeError(f"{field}: cannot download {repo_id}: {type(exc).__name__}") from None
