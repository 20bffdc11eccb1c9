"""Where banks and tool outputs live: local paths and fsspec URLs (``file://``, ``s3://``, ``gs://``, ``memory://``).

The one module that knows the difference. Every other module calls these functions with a path or a URL and
never tests for ``://`` itself. Local paths use ``os``/``shutil`` (atomic ``os.replace``, symlinks left alone);
URLs go through ``fsspec`` (imported only when a URL is used).
"""

from __future__ import annotations

import errno
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


def folder_problem(folder: PathLike) -> str | None:
    """Why new files cannot be made in the local folder ``folder`` (created with its parents when missing), in
    words naming the cause (a file in the way, permission denied, a read-only file system, a folder that takes no
    files such as ``/proc``), or None when a file can be made there. A full disk is not reported here: writing
    reports it where it happens (and a rerun resumes)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((a for a in (folder, *folder.parents) if os.path.lexists(a) and not a.is_dir()), folder)
        return f"{blocker} is a file, not a folder"
    except OSError as e:
        return _cause(e, folder)
    probe = folder / f".write-test-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        return _cause(e, folder)
    return None


def _cause(e: OSError, folder: Path) -> str | None:
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: this user cannot create files in {e.filename or folder}"
    if e.errno == errno.EROFS:
        return f"{folder} is on a read-only file system (Read-only file system)"
    if e.errno == errno.ENOENT:
        return f"{folder} takes no new files (No such file or directory: a virtual file system such as /proc?)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return None
    return f"cannot create files in {folder}: {e.strerror}"
