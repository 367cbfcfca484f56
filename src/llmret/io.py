"""Atomic file writes: a job that fails half-way leaves no output that looks complete."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[str]], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it onto ``path``
    (same filesystem, so the rename is atomic); on any error the temporary file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_publish(write: Callable[[Path], None], out_path: str | os.PathLike) -> None:
    """Write through ``write(tmp)`` into a sibling temp file, fsync, then rename onto
    ``out_path``: a crash never leaves a file that looks complete."""
    out_path = Path(out_path)
    tmp = atomic_tmp_path(out_path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_tmp_path(out_path: Path) -> Path:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    os.close(fd)
    return Path(tmp)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
