"""Safe unpacking of downloaded zip archives: members that would escape the target (path
traversal, absolute paths, symlinks), that are named twice or that would unpack to more than
the caps allow (a zip bomb) are refused before anything is written, only the files asked for
are extracted, and the unpacked folder replaces the old one in one rename. Design notes:
docs/retrieval.md."""

from __future__ import annotations

import fnmatch
import logging
import os
import posixpath
import stat
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from llmret import schema
from llmret.atomic_files import fsync_dir, remove_quietly, unique_sibling

logger = logging.getLogger(__name__)
_CHUNK = 1 << 20
# macOS Finder junk that some zips carry; never part of a dataset.
_JUNK_DIRS = frozenset({"__MACOSX"})
_JUNK_FILES = frozenset({".DS_Store"})
# A dataset's own files in a BEIR zip, below its top folder (what llmret.data.beir reads).
BEIR_MEMBERS = ("corpus.jsonl", "queries.jsonl", "qrels/*.tsv")
_GIB = 1 << 30


class ArchiveError(RuntimeError):
    """An archive cannot be read (corrupt, truncated, CRC error); names the archive."""


class UnsafeArchiveError(ArchiveError):
    """A member would escape the target, is a symlink or another non-regular file, lies
    outside the expected top folder, is named twice or unpacks past the caps (``download.max_*``,
    a zip bomb); names archive and member."""


class ArchiveLayoutError(ArchiveError):
    """The archive holds its files under another top folder than the one expected."""


@dataclass(frozen=True)
@schema.defaults_from("download")
class ExtractLimits:
    """What a dataset zip may unpack to (``download.max_unpacked_gib``, ``max_member_gib``,
    ``max_ratio``): checked against the sizes the zip declares before anything is written,
    and against the bytes written while extracting."""

    max_unpacked_gib: float
    max_member_gib: float
    max_ratio: float

    def __post_init__(self) -> None:
        schema.check_bounds(self, "download", "download.")

    def check(self, archive: Path, info: zipfile.ZipInfo, total: int) -> None:
        """Refuse a member (declared ``file_size``) or the running ``total`` over the caps."""
        size, packed = info.file_size, info.compress_size
        if size > self.max_member_gib * _GIB:
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} unpacks to {size:,} bytes, more than "
                f"download.max_member_gib ({self.max_member_gib:g} GiB)"
            )
        if size > self.max_ratio * max(packed, 1):
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} unpacks to {size / max(packed, 1):.0f} times its "
                f"compressed size ({size:,} from {packed:,} bytes), more than download.max_ratio "
                f"({self.max_ratio:g}); a zip bomb looks like this"
            )
        if total > self.max_unpacked_gib * _GIB:
            raise UnsafeArchiveError(
                f"{archive}: the files to extract unpack to {total:,} bytes in all (at member "
                f"{info.filename!r}), more than download.max_unpacked_gib ({self.max_unpacked_gib:g} GiB)"
            )


# --------------------------------------------------------------------------- zip


def _member_target(archive: Path, info: zipfile.ZipInfo, strip: str | None) -> str | None:
    """Validate one member; return its relative POSIX path in target, None to skip."""
    raw = info.filename
    name = raw.replace("\\", "/")  # treat backslashes as separators for the checks
    if PurePosixPath(name).is_absolute() or PureWindowsPath(raw).drive or PureWindowsPath(raw).is_absolute():
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has an absolute path")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise UnsafeArchiveError(f"{archive}: member {raw!r} is a symlink")
    if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise UnsafeArchiveError(f"{archive}: member {raw!r} is not a regular file or folder (mode {mode:o})")
    norm = posixpath.normpath(name) if name else "."
    if norm == ".." or norm.startswith("../"):
        raise UnsafeArchiveError(f"{archive}: member {raw!r} escapes the target folder")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if not parts or parts[0] in _JUNK_DIRS or parts[-1] in _JUNK_FILES:
        return None
    if strip:
        prefix = [p for p in strip.replace("\\", "/").split("/") if p]
        if parts[: len(prefix)] != prefix or (len(parts) == len(prefix) and not info.is_dir()):
            raise UnsafeArchiveError(
                f"{archive}: member {raw!r} is not under the expected top-level folder {'/'.join(prefix)!r}/"
            )
        parts = parts[len(prefix) :]
        if not parts:
            return None  # the top-level folder entry itself
    return "/".join(parts)


def _check_top_level(archive: Path, infos: list[zipfile.ZipInfo], strip: str | None) -> None:
    """A zip with nothing under the expected top folder is another layout, not an attack:
    say which folder it has (a dataset named unlike its zip sets ``zip_folder``)."""
    if not strip:
        return
    prefix = strip.strip("/").replace("\\", "/") + "/"
    tops = set()
    for info in infos:
        name = info.filename.replace("\\", "/")
        if name.startswith(prefix):
            return
        top = name.split("/", 1)[0]
        if top and top not in _JUNK_DIRS and top not in _JUNK_FILES:
            tops.add(top)
    raise ArchiveLayoutError(
        f"{archive}: no member under the expected top folder {prefix!r}; its top level holds "
        f"{sorted(tops)[:5]} (a dataset named unlike its zip's folder sets zip_folder)"
    )


def _open_zip(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
        raise ArchiveError(f"{archive}: not a readable zip archive ({e})") from e


def _wanted(rel: str, patterns: Sequence[str]) -> bool:
    """Whether a member's path (below the stripped folder) matches one of ``patterns``, part
    by part (``qrels/*.tsv`` matches ``qrels/test.tsv``, not ``qrels/a/test.tsv``)."""
    parts = rel.split("/")
    for pattern in patterns:
        want = pattern.split("/")
        if len(want) == len(parts) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, want, strict=True)):
            return True
    return False


def _plan(
    archive: Path,
    infos: list[zipfile.ZipInfo],
    strip: str | None,
    members: Sequence[str] | None,
    limits: ExtractLimits,
) -> list[tuple[zipfile.ZipInfo, str]]:
    """The members to extract and their paths in the target, every check done: unsafe names,
    a path named twice (or as a file and a folder), the caps; members outside ``members``
    are skipped and named in a warning."""
    plan: list[tuple[zipfile.ZipInfo, str]] = []
    files: dict[str, str] = {}
    folders: set[str] = set()
    skipped: list[str] = []
    total = 0
    for info in infos:
        rel = _member_target(archive, info, strip)
        if rel is None:
            continue
        parents = rel.split("/")[:-1]
        folders.update("/".join(parents[: i + 1]) for i in range(len(parents)))
        if info.is_dir():
            folders.add(rel)
            if members is None:
                plan.append((info, rel))
            continue
        if rel in files:
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} names {rel!r} more than once (first as "
                f"{files[rel]!r}); refused rather than let one copy silently win"
            )
        files[rel] = info.filename
        if members is not None and not _wanted(rel, members):
            skipped.append(info.filename)
            continue
        total += info.file_size
        limits.check(archive, info, total)
        plan.append((info, rel))
    clash = sorted(folders & set(files))
    if clash:
        raise UnsafeArchiveError(f"{archive}: member {files[clash[0]]!r} is both a file and a folder")
    if skipped:
        logger.warning("%s: skipped %d member(s) outside %s: %s", archive, len(skipped), list(members), skipped[:10])
    return plan


def _copy_member(zf: zipfile.ZipFile, archive: Path, info: zipfile.ZipInfo, out: str) -> None:
    """Write one member, never more bytes than it declares (which the caps checked)."""
    written = 0
    try:
        with zf.open(info) as src, open(out, "wb") as dst:
            while chunk := src.read(_CHUNK):
                written += len(chunk)
                if written > info.file_size:
                    raise UnsafeArchiveError(
                        f"{archive}: member {info.filename!r} unpacks to more than "
                        f"its declared {info.file_size:,} bytes"
                    )
                dst.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
        raise ArchiveError(f"{archive}: corrupt member {info.filename!r} ({e})") from e


def safe_extract_zip(
    archive: str | Path,
    target: str | Path,
    *,
    strip_top_level: str | None = None,
    members: Sequence[str] | None = None,
    limits: ExtractLimits | None = None,
) -> Path:
    """Extract *archive* into folder *target* safely and atomically.

    Every member is checked before anything is written: absolute paths, '..'
    escapes and symlinks raise UnsafeArchiveError, and so do a path named twice
    and sizes over *limits* (default: the schema's ``download`` caps; a zip bomb).
    With *strip_top_level* (e.g. 'scifact' for BEIR zips) every member must live
    under that folder and is written without it, so ``target/corpus.jsonl``
    exists; anything else is rejected.  With *members* (path patterns below that
    folder, e.g. :data:`BEIR_MEMBERS`) only matching files are extracted, the
    others skipped with a warning.  macOS junk (``__MACOSX/``, ``.DS_Store``) is
    skipped.  Files are extracted into a temp folder beside *target*
    (CRC-checked while reading) and renamed into place; an existing *target* is
    replaced only once the new one is complete.  Corrupt/truncated archives
    raise ArchiveError naming the archive; on any failure the temp folder is
    removed and *target* is left as it was.  Returns *target* as a Path.
    """
    archive = Path(archive)
    target = Path(target)
    with _open_zip(archive) as zf:
        try:
            infos = zf.infolist()
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise ArchiveError(f"{archive}: cannot read member list ({e})") from e
        _check_top_level(archive, infos, strip_top_level)
        plan = _plan(archive, infos, strip_top_level, members, limits or ExtractLimits())
        if not any(not info.is_dir() for info, _ in plan):
            raise ArchiveError(f"{archive}: contains no files to extract into {target}")

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = unique_sibling(target.parent, f".{target.name}.extract-", lambda p: p.mkdir())
        try:
            root = os.path.realpath(tmp)
            n_files = 0
            for info, rel in plan:
                out = os.path.realpath(os.path.join(root, *rel.split("/")))
                if os.path.commonpath([root, out]) != root:  # belt and braces
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} escapes the target folder")
                if info.is_dir():
                    os.makedirs(out, exist_ok=True)
                    continue
                os.makedirs(os.path.dirname(out), exist_ok=True)
                _copy_member(zf, archive, info, out)
                n_files += 1
            swap_into_place(tmp, target)
        except BaseException:
            remove_quietly(tmp)
            raise
    fsync_dir(target.parent)
    logger.info("extracted %d files from %s into %s", n_files, archive, target)
    return target


def swap_into_place(new: Path, target: Path) -> None:
    """Rename *new* onto *target*, replacing an existing target only after success."""
    if not os.path.lexists(target):
        os.rename(new, target)
        return
    holder = unique_sibling(target.parent, f".{target.name}.old-", lambda p: p.mkdir())
    old = holder / "old"
    try:
        os.rename(target, old)
    except BaseException:
        remove_quietly(holder)
        raise
    try:
        os.rename(new, target)
    except BaseException:
        try:
            os.rename(old, target)  # put the previous content back
        except OSError as e:  # keep it where it is rather than lose it
            logger.error("could not restore %s; previous content kept in %s: %s", target, old, e)
        else:
            remove_quietly(holder)
        raise
    remove_quietly(holder)
