"""A checkpoint source -> a local folder: an existing folder as is, a Hugging Face repo id downloaded.

    folder = resolve("./Mistral-7B-v0.1")                   # a folder: returned unchanged
    folder = resolve("mistralai/Mistral-7B-Instruct-v0.3")  # the snapshot folder in the HF cache

Only the files ventoux needs are downloaded: one weight layout (HF safetensors if the repo has them, else
Mistral's consolidated file), its config, and the tokenizer files. The token comes from HF_TOKEN (or the
saved login), as huggingface_hub does by default. Offline (HF_HUB_OFFLINE=1 or no network) a repo already
in the cache is used from there; otherwise the failure is one line saying what happened.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import VentouxError
from .weights import HF_INDEX, TOKENIZER_FILES

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")
# Names of transport-level failures across the HTTP stacks huggingface_hub has used (requests, httpx, httpx2).
_TRANSPORT_ERRORS = {"ConnectionError", "ConnectError", "Timeout", "TimeoutException", "TransportError"}


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source)) and ".." not in source


def resolve(source: str | Path, weights: bool = True) -> Path:
    """A local checkpoint folder for `source`; weights=False fetches only the config and tokenizer files."""
    if not isinstance(source, (str, Path)) or not str(source).strip():
        raise VentouxError(f"model source {source!r} is not a checkpoint folder or a Hugging Face repo id (org/name)")
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise VentouxError(f"{source} is a file; pass the checkpoint folder that holds it")
    if isinstance(source, Path) or not looks_like_repo_id(source):
        raise VentouxError(f"no such folder: {source}; pass a checkpoint folder or a Hugging Face repo id (org/name)")
    return _download(source, weights)


def allow_patterns(repo_id: str, files: list[str], weights: bool = True) -> list[str]:
    """The files of a repo ventoux needs: one weight layout, never both (HF safetensors preferred)."""
    present = set(files)
    shards = sorted(f for f in present if _SHARD.match(f))
    if HF_INDEX in present and shards:
        chosen = [HF_INDEX, *shards]
    else:
        chosen = next(([f] for f in ("model.safetensors", "consolidated.safetensors", "consolidated.00.pth")
                       if f in present), None)
    if chosen is None:
        raise VentouxError(f"{repo_id} has no Mistral weights ventoux can read (model.safetensors, its shards, "
                           "consolidated.safetensors or consolidated.00.pth)")
    configs = [f for f in ("config.json", "params.json") if f in present]
    return (chosen if weights else []) + configs + list(TOKENIZER_FILES)


def _download(repo_id: str, weights: bool) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    unreachable = None  # why the Hub could not be listed, when it could not
    try:
        try:
            # model_info, not list_repo_files: it is one request without huggingface_hub's backoff (as
            # snapshot_download's own first call), so a dead network fails at once instead of retrying ~25 s
            files = [s.rfilename for s in HfApi().model_info(repo_id).siblings or ()]
        except Exception as e:  # noqa: BLE001 - only transport failures are handled, the rest is re-raised
            if not _is_unreachable(e):
                raise
            unreachable, files = e, _cached_files(repo_id)
        patterns = allow_patterns(repo_id, files, weights) if files is not None else None
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=unreachable is not None))
    except GatedRepoError:
        raise VentouxError(f"{repo_id} is gated: accept its terms on https://huggingface.co/{repo_id} and set "
                           "HF_TOKEN to a token of that account") from None
    except RepositoryNotFoundError:
        raise VentouxError(f"no local folder {repo_id} and no Hugging Face repo {repo_id} (or it is private: set "
                           "HF_TOKEN); check the path or the repo id") from None
    except LocalEntryNotFoundError:
        if isinstance(unreachable, OfflineModeIsEnabled):
            raise VentouxError(f"cannot download {repo_id}: HF_HUB_OFFLINE=1 and it is not in the local cache; pass "
                               "a local folder or set HF_HUB_OFFLINE=0 when online") from None
        raise VentouxError(f"cannot download {repo_id}: no network connection (offline?) and it is not (fully) in "
                           "the local cache; pass a local folder or retry when online") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "?")  # an HfHubHTTPError always holds its response
        raise VentouxError(f"cannot download {repo_id}: the Hub answered HTTP {status}; retry later or pass a "
                           "local folder") from None
    except Exception as e:  # noqa: BLE001 - a connection lost mid-download, or the disk; anything else re-raised
        if _is_unreachable(e):
            raise VentouxError(f"cannot download {repo_id}: the connection failed ({type(e).__name__}); retry when "
                               "online or pass a local folder") from None
        if isinstance(e, OSError):
            raise VentouxError(f"cannot download {repo_id}: {e}; check disk space and HF_HOME, or pass a local "
                               "folder") from None
        raise


def _is_unreachable(e: BaseException) -> bool:
    """Offline mode or a transport failure (no HTTP answer), whatever HTTP library huggingface_hub uses."""
    return isinstance(e, (ConnectionError, TimeoutError)) or any(
        c.__name__ in _TRANSPORT_ERRORS for c in type(e).__mro__)


def _cached_files(repo_id: str) -> list[str] | None:
    """The repo's file list as a previous download cached it, or None (then the cached snapshot is used as is)."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # huggingface_hub < 2 keeps no listing; snapshot_download returns the snapshot unchecked
        return None
    try:
        return [f.path for f in get_cached_repo_tree(repo_id)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return None
