"""Atomic file writes: a job that fails half-way leaves no output that looks complete."""

from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)


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


def atomic_copy(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy ``src`` onto ``dest`` through a temporary sibling and a rename (e.g. a training
    log kept beside the checkpoints while training, published as the stage's output)."""
    atomic_publish(lambda tmp: shutil.copyfile(src, tmp), dest)


def unique_sibling(parent: Path, prefix: str, create: Callable[[Path], None]) -> Path:
    """Create a new uniquely named entry in *parent* with *create* and return its path.

    Unlike tempfile.mkstemp/mkdtemp this lets ``create`` use default permissions
    (0666/0777 minus umask), so the final renamed file/folder is not private 0600/0700.
    """
    for _ in range(100):
        candidate = parent / f"{prefix}{os.urandom(4).hex()}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no unique temporary name available", str(parent))


def create_file(p: Path) -> None:
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def remove_quietly(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:  # never mask the original failure
        logger.warning("could not remove temporary %s: %s", p, e)


def fsync_dir(d: Path) -> None:
    """Persist a rename in *d* (best effort; not all filesystems allow it)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid < 2**22  # someone else's process, or not a pid at all
    return True


def remove_stale_temporaries(outputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Remove what killed writers of ``outputs`` left beside them (``.{name}.part-*``,
    ``.{name}.extract-*``, ``.{name}.tmp-PID``, ...): called by a job before it writes its
    outputs, when no other writer of them can exist (Snakemake runs one job per output). A
    temporary named after a live process other than this one is kept."""
    removed = []
    for out in map(Path, outputs):
        if not out.parent.is_dir():
            continue
        for p in out.parent.glob(f".{glob.escape(out.name)}.*"):
            m = re.search(r"-(\d+)$", p.name)
            if m and int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1))):
                continue
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            logger.warning("removed %s (%.1f MB), left by an earlier run that did not finish", p, size / 1e6)
            removed.append(p)
    return removed
