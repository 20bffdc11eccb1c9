"""Where banks and tool outputs live: local paths and fsspec URLs (``file://``, ``s3://``, ``gs://``, ``memory://``).

The one module that knows the difference. Every other module calls these functions with a path or a URL and
never tests for ``://`` itself. Local paths use ``os``/``shutil`` (atomic ``os.replace``, symlinks left alone);
URLs go through ``fsspec`` (imported only when a URL is used).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import zarr

PathLike = str | Path


def name_for_path(model: str) -> str:
    """A model name as one path component: ``timm/x.tag`` -> ``timm-x.tag``, ``pkg.mod:fn`` -> ``pkg.mod-fn`` (bank
    file names, default run directories)."""
    return model.replace("/", "-").replace(":", "-")


def is_url(path: PathLike) -> bool:
    """Whether ``path`` is an fsspec URL (``scheme://...``) rather than a local path."""
    return "://" in str(path)


def _fs(url: PathLike) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(str(url))


def storage_options(path: PathLike) -> dict | None:
    """fsspec options zarr needs for ``path``: local ``file://`` stores must create the chunk folders they write."""
    if is_url(path) and str(path).split("://", 1)[0] in ("file", "local"):
        return {"auto_mkdir": True}
    return None


def exists(path: PathLike) -> bool:
    """Whether anything is at ``path`` (a dangling local symlink counts: it would be overwritten otherwise)."""
    if is_url(path):
        fs, p = _fs(path)
        return bool(fs.exists(p))
    return os.path.lexists(path)


def remove(path: PathLike) -> None:
    """Remove a file or a whole tree at ``path``; nothing there is not an error. A local symlink is unlinked,
    never followed."""
    if is_url(path):
        fs, p = _fs(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def rename(src: PathLike, dst: PathLike) -> None:
    """Move ``src`` to ``dst`` (atomic ``os.replace`` for local paths; an fsspec move for URLs)."""
    if is_url(src):
        fs, p = _fs(src)
        _, q = _fs(dst)
        fs.mv(p, q, recursive=True)
    else:
        os.replace(src, dst)


def size(path: PathLike) -> int:
    """Bytes stored under ``path`` (a file or a whole tree); 0 when nothing is there."""
    if is_url(path):
        fs, p = _fs(path)
        return int(sum(fs.du(p, total=False).values())) if fs.exists(p) else 0
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def absolute(path: PathLike) -> str:
    """``path`` as recorded in attrs: absolute for local paths, unchanged for URLs."""
    return str(path) if is_url(path) else str(Path(path).resolve())


def parent_exists(path: PathLike) -> bool:
    """Whether the folder that would hold ``path`` exists (URLs: always true, stores create prefixes)."""
    return is_url(path) or Path(path).parent.is_dir()


def open_zarr_group(path: PathLike, mode: str = "r") -> zarr.Group:
    """``zarr.open_group`` at a local path or URL with the right storage options (errors propagate)."""
    return zarr.open_group(str(path), mode=mode, storage_options=storage_options(path))
