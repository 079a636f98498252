"""Atomic output directories: everything is written into a hidden sibling, then swapped into place, so
a failed or interrupted run never leaves a half-written directory behind."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from spectrt.runtime.errors import SpectrtError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def staging_dir(target: str | os.PathLike) -> Path:
    """An empty hidden sibling of ``target`` with the modes a plain mkdir would give (not mkdtemp's 0700)."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def publish_dir(staging: Path, target: str | os.PathLike, keep_existing: bool = False, drop=()) -> None:
    """Move ``staging`` to ``target``, replacing an existing ``target``.

    ``keep_existing``: files of the old ``target`` that staging lacks (a report, a README) are carried over,
    except the names in ``drop``.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise SpectrtError(f"{target}: exists and is not a directory")
    for f in staging.iterdir():  # writers that use mkstemp (safetensors) leave 0600 files behind
        if f.is_file():
            os.chmod(f, 0o666 & ~_umask())
    if not target.exists():
        os.replace(staging, target)
        return
    if keep_existing:
        for f in target.iterdir():
            if f.name not in drop and not (staging / f.name).exists():
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, staging / f.name)
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "d")
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(target: str | os.PathLike, keep_existing: bool = False, drop=()):
    """``with staged(DIR) as tmp:`` write into ``tmp``; on success it becomes ``DIR``, on any error it is removed."""
    tmp = staging_dir(target)
    try:
        yield tmp
        publish_dir(tmp, target, keep_existing, drop)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
