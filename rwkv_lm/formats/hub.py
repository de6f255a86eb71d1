"""Models by Hugging Face Hub name: `hf:OWNER/REPO/FILE`, `hf:OWNER/REPO@REVISION/FILE`, or `hf:OWNER/REPO` (a
whole fla-hub folder), resolved to a local path through huggingface_hub, with its cache, its token (HF_TOKEN
or a saved login) and its offline mode (HF_HUB_OFFLINE=1 reads the cache only).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..files import CheckpointError

PREFIX = "hf:"
# a whole folder: what reading an fla-hub model needs, not every file a repo holds
FOLDER_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "rwkv_vocab_*.txt"]


def is_hub_name(name) -> bool:
    """Whether a model path is a hub name (a str or a Path made from one, as argparse's type=Path makes)."""
    return isinstance(name, (str, os.PathLike)) and os.fspath(name).startswith(PREFIX)


def parse(name) -> tuple[str, str | None, str | None]:
    """"hf:OWNER/REPO[@REVISION][/FILE]" -> (repo id, revision or None, file or None)."""
    name = os.fspath(name)
    parts = name[len(PREFIX):].split("/", 2)
    if len(parts) < 2 or not all(parts[:2]) or (len(parts) == 3 and not parts[2]):
        raise CheckpointError(f"{name}: a hub name is hf:OWNER/REPO/FILE, hf:OWNER/REPO@REVISION/FILE or hf:OWNER/REPO")
    repo, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{repo}", revision or None, parts[2] if len(parts) == 3 else None


def resolve(name) -> Path:
    """The local path of a hub name (a file, or a snapshot folder), downloading it into the cache if needed."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub import errors

    repo_id, revision, filename = parse(name)
    name = os.fspath(name)
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        if filename is None:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=FOLDER_FILES))
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except errors.GatedRepoError:  # (before its base class, RepositoryNotFoundError)
        raise CheckpointError(f"{name}: {repo_id} is gated; accept its terms on the Hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"{name}: no repository {repo_id} on the Hub (or it is private: set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{name}: {repo_id} has no revision {revision!r}") from None
    except errors.LocalEntryNotFoundError:  # (before its base class, EntryNotFoundError)
        what = f"file {filename!r}" if filename else "snapshot"
        raise CheckpointError(f"{name}: the {what} of {where} is not in the Hugging Face cache and the Hub cannot be "
                              "reached (offline: HF_HUB_OFFLINE=1, or no network); download it once online") from None
    except errors.EntryNotFoundError:
        raise CheckpointError(f"{name}: {where} has no file {filename!r}") from None
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as e:
        raise CheckpointError(f"{name}: cannot fetch from {where} ({' '.join(str(e).split())})") from None
