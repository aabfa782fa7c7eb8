"""Resolve a Hugging Face hub id or a local folder to a local folder, offline-aware, with one clear error.

Every stage's ``from_pretrained`` goes through :func:`resolve_pretrained`, so a missing model always fails the same
way: :class:`MissingWeightsError` naming the repo, the cache folder it looked in, and the two fixes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_TRUE = {"1", "on", "yes", "true"}


def hub_cache_dir() -> Path:
    """The hub cache folder, read from the environment now (not at import), as huggingface_hub defines it."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg_cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg_cache).expanduser() / "huggingface" / "hub"


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


class MissingWeightsError(FileNotFoundError):
    """Model files are neither in a given local folder nor in the hub cache (and could not be downloaded).

    Attributes:
        repo: the hub id or local path that was asked for.
        reason: what went wrong, in a few words.
        cache_dir: the hub cache folder that was searched.
    """

    def __init__(self, repo: str, reason: str = "", cache_dir: str | Path | None = None, download_hint: str = ""):
        self.repo = str(repo)
        self.reason = reason
        self.cache_dir = Path(cache_dir) if cache_dir is not None else hub_cache_dir()
        self.download_hint = download_hint or f"huggingface-cli download {self.repo}"
        message = (
            f"Model files for {self.repo!r} are not available"
            + (f": {reason}" if reason else "")
            + f". Looked in the Hugging Face cache at {self.cache_dir} (set by HF_HUB_CACHE / HF_HOME)"
            + (", with downloads disabled (HF_HUB_OFFLINE=1 or local_files_only=True)" if is_offline() else "")
            + ". Fix it in one of two ways: (1) run once with network access (unset HF_HUB_OFFLINE), or run "
            f"`{self.download_hint}`, then retry; or (2) pass a local folder that holds the model files "
            "instead of the hub id."
        )
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.repo, self.reason, self.cache_dir, self.download_hint)


def _looks_like_local_path(repo_or_path: str) -> bool:
    # Hub ids are "name" or "org/name"; anything with more parts, a drive, or a leading ./~ is a path.
    return (
        repo_or_path.startswith((".", "/", "~", "\\"))
        or repo_or_path.count("/") > 1
        or "\\" in repo_or_path
        or (len(repo_or_path) > 1 and repo_or_path[1] == ":")
    )


def resolve_pretrained(
    repo_or_path: str | os.PathLike,
    *,
    allow_patterns: Sequence[str] | str | None = None,
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """Return a local folder holding the model: the folder itself, or the hub snapshot (downloaded if allowed).

    Args:
        repo_or_path: a local folder, or a hub id such as ``"hansyan/perflow-sd15-delta-weights"``.
        allow_patterns: glob patterns of the files to fetch from the hub (all files when `None`).
        revision: branch, tag or commit on the hub (the default branch when `None`).
        local_files_only: never touch the network. `None` follows ``HF_HUB_OFFLINE``.

    Raises:
        MissingWeightsError: the folder does not exist, or the hub id is neither cached nor downloadable.
    """
    path = Path(repo_or_path).expanduser()
    if path.is_dir():
        return path
    repo = str(repo_or_path)
    cache_dir = hub_cache_dir()
    if path.exists():
        raise MissingWeightsError(repo, "this is a file; pass the folder that holds it", cache_dir)
    if isinstance(repo_or_path, Path) or _looks_like_local_path(repo):
        raise MissingWeightsError(repo, "no such local folder", cache_dir)

    offline = is_offline() if local_files_only is None else bool(local_files_only)
    hint = f"huggingface-cli download {repo}"
    if revision is not None:
        hint += f" --revision {revision}"
    if allow_patterns is not None:
        patterns = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns)
        hint += " --include " + " ".join(f'"{p}"' for p in patterns)

    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo,
            revision=revision,
            allow_patterns=allow_patterns,
            cache_dir=cache_dir,
            local_files_only=offline,
        )
    except HFValidationError as error:
        raise MissingWeightsError(repo, f"not a local folder nor a valid hub id ({error})", cache_dir, hint) from error
    except GatedRepoError as error:
        raise MissingWeightsError(
            repo,
            "the repo is gated: accept its licence on huggingface.co and `huggingface-cli login`",
            cache_dir,
            hint,
        ) from error
    except RepositoryNotFoundError as error:
        raise MissingWeightsError(repo, "the hub has no such repo (or it is private)", cache_dir, hint) from error
    except RevisionNotFoundError as error:
        raise MissingWeightsError(repo, f"the hub repo has no revision {revision!r}", cache_dir, hint) from error
    except LocalEntryNotFoundError as error:
        reason = "not in the cache" + (" and downloads are disabled" if offline else " and the hub is unreachable")
        raise MissingWeightsError(repo, reason, cache_dir, hint) from error
    logger.debug("Resolved %s to %s", repo, folder)
    return Path(folder)
