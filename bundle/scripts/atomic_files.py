"""Files and folders written to a temporary sibling and moved into place, so a crash never leaves half of one behind.

:func:`atomic_path` is the one place that does temp + ``os.replace``; every writer of a result file goes through it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator


def temp_sibling(path: str | os.PathLike) -> str:
    """A hidden, unique name next to ``path`` that keeps its extensions (``.x.nii.gz.<id>.tmp.nii.gz``): writers such
    as ITK, PIL or ``torch.jit.save`` pick the format from the ending, and folder listings skip hidden names."""
    folder, base = os.path.split(os.fspath(path))
    dot = base.find(".", 1)
    ending = base[dot:] if dot > 0 else ""
    return os.path.join(folder, f".{base}.{uuid.uuid4().hex[:12]}.tmp{ending}")


def move_into_place(tmp: str | os.PathLike, path: str | os.PathLike, replace_folder: bool = True) -> None:
    """``os.replace(tmp, path)``. A folder cannot replace a non-empty folder, so an existing folder at ``path`` is
    removed first when ``replace_folder``; otherwise ``os.replace`` raises (the caller decides, e.g. a cache entry
    another process completed meanwhile)."""
    if replace_folder and os.path.isdir(tmp) and os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace_folder: bool = True) -> Iterator[str]:
    """Yield a temporary sibling of ``path`` to write (a file, or a folder the caller creates); on success it is moved
    onto ``path`` (:func:`move_into_place`), on any failure it is removed and the old ``path`` stays untouched."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    tmp = temp_sibling(path)
    try:
        yield tmp
        move_into_place(tmp, path, replace_folder)
    finally:
        _remove(tmp)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """``json.dump(data, indent=2)`` to ``path`` through :func:`atomic_path`; values JSON lacks become text."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
