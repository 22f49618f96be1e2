"""Write-then-rename helpers: outputs appear complete or not at all.

A file or directory (zarr store, run folder) is written under a hidden temporary name in
the same directory (same filesystem, so the rename is atomic on POSIX, GPFS and BeeGFS)
and moved into place only when the writer finished without an exception.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from hpcstain.errors import UsageError


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_output(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse to touch an existing output unless ``overwrite`` was asked for."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path}: output exists (pass --overwrite to replace it)")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path; on success move it to ``path`` (file or directory).

    On an exception the temporary output is removed and an existing ``path`` is left
    untouched. With ``overwrite`` an existing output is replaced only after the new one
    is complete.
    """
    path = check_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"{path}: writer produced no output at {tmp}")
    if path.exists():
        old = _tmp_sibling(path, "old")
        path.rename(old)
        tmp.rename(path)
        _remove(old)
    else:
        tmp.rename(path)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsync'ed temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
