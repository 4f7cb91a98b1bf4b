"""Adapters named by a Hugging Face Hub repository, `org/name` or `org/name@revision`, found in
huggingface_hub's local cache only: nothing is ever downloaded (HF_HUB_OFFLINE semantics). A
local path that exists always wins over a Hub name of the same spelling."""

from __future__ import annotations

import os
import re

from .io import AdapterError

# A repository id as the Hub spells one (namespace/name), then an optional @revision: a branch,
# tag or commit hash (branches may hold "/", e.g. refs/pr/1).
_HUB_NAME = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<revision>[^\s@]+))?")
# A snapshot folder of the cache: <cache>/models--<org>--<name>/snapshots/<commit>.
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})(?:/|$)")


def cache_dir() -> str:
    """huggingface_hub's cache folder as the environment says it now (HF_HUB_CACHE, else
    HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub), read at each call rather than at import
    so that a changed environment counts."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def split_name(name) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `name` is spelled like a Hub adapter name, else None."""
    if not isinstance(name, str):
        return None
    m = _HUB_NAME.fullmatch(name)
    if m is None or ".." in m["repo"] or "--" in m["repo"]:
        return None
    return m["repo"], m["revision"]


def local_path(adapter, cache: str | None = None):
    """`adapter` unchanged when it exists on disk or is not a Hub name (the reader then says
    what is wrong with it); else the folder of the cached snapshot it names."""
    if not isinstance(adapter, str) or os.path.lexists(adapter) or split_name(adapter) is None:
        return adapter
    return resolve(adapter, cache)


def resolve(name: str, cache: str | None = None) -> str:
    """The snapshot folder of the cached Hub repository `org/name[@revision]` (revision: branch,
    tag or commit; main by default), or an AdapterError naming the repository, revision and cache
    folder when it is not cached. Only the local cache is read."""
    parts = split_name(name)
    if parts is None:
        raise AdapterError(name, "not a Hub adapter name (expected org/name or org/name@revision)")
    repo, revision = parts
    folder = cache if cache is not None else cache_dir()
    where = f"{repo} (revision {revision or 'main'}) in the Hugging Face cache {folder}"
    try:
        import huggingface_hub
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HFValidationError, LocalEntryNotFoundError
    except ImportError:
        raise AdapterError(
            name, "no such file or directory, and huggingface_hub (which finds Hub names) is not installed"
        ) from None
    try:
        path = snapshot_download(repo, revision=revision, cache_dir=folder, local_files_only=True)
    except LocalEntryNotFoundError:
        raise AdapterError(
            name, f"no such file or directory, and not cached: {where} (knots-merge never downloads)"
        ) from None
    except getattr(getattr(huggingface_hub, "errors", None), "IncompleteSnapshotError", ()):  # (newer versions)
        raise AdapterError(name, f"the cached snapshot of {where} is incomplete") from None
    except HFValidationError as e:
        raise AdapterError(name, f"not a valid Hub repository name: {e}") from None
    return os.fspath(path)


def hub_source(path) -> str | None:
    """`org/name@commit` when `path` lies in a snapshot folder of a Hub cache, else None."""
    m = _SNAPSHOT.search(os.path.abspath(os.fspath(path)).replace(os.sep, "/"))
    return None if m is None else f"{m['org']}/{m['name']}@{m['commit']}"
