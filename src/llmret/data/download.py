"""Robust downloads for the workflow: streamed into a temporary sibling, md5-checked,
retried on transient errors, bounded by a deadline on each whole attempt (a server that
trickles bytes does not hold a job forever) and renamed into place, so Snakemake never sees
a partial file; mirror resolution and streams for readers that take a prefix.

Design notes: docs/retrieval.md.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from llmret import schema
from llmret.atomic_files import create_file, fsync_dir, remove_quietly, unique_sibling

__all__ = [
    "ChecksumError",
    "DownloadError",
    "fetch",
    "md5sum",
    "resolve_source",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
_USER_AGENT = "llmret-download/1.0 (+https://github.com/)"
_URL_SCHEMES = ("http", "https", "file")


class DownloadError(RuntimeError):
    """A fetch failed; the message names the source and the destination."""


class ChecksumError(DownloadError):
    """The fetched bytes do not have an accepted md5 (final, never retried)."""

    def __init__(self, source: str, dest: Path, expected: Sequence[str], actual: str) -> None:
        self.source = source
        self.dest = dest
        self.expected = list(expected)
        self.actual = actual
        want = " or ".join(self.expected)
        super().__init__(f"md5 mismatch for {source} -> {dest}: expected {want}, got {actual}")


class _TransientError(Exception):
    """Internal: an attempt failed in a retryable way (network, 5xx/429, truncation)."""


class _FatalError(Exception):
    """Internal: an attempt failed in a way retrying cannot fix (404, missing file)."""


# --------------------------------------------------------------------------- sources


def _url_scheme(s: str) -> str | None:
    """Return the lower-cased scheme if *s* looks like a URL ('x://...'), else None.

    Only 'scheme://' counts, so Windows paths like 'C:\\data' stay local paths.
    """
    if "://" not in s:
        return None
    scheme = s.split("://", 1)[0].lower()
    if scheme and scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return scheme
    return None


def resolve_source(url: str, mirror: str | None, mirror_path: str) -> str:
    """Pick where to fetch from: *url* itself, or *mirror_path* under a mirror.

    Lets an offline cluster (or a test) point the whole workflow at a local
    folder or an internal HTTP server without editing every URL.  The mirror may
    be a local folder (absolute, relative or '~'), a ``file://`` URL or an
    ``http(s)://`` base URL; the result keeps the mirror's form (a path stays a
    path, a URL stays a URL, with *mirror_path* percent-quoted).  Exactly one
    slash joins the two parts.
    """
    if not mirror:
        return url
    rel = mirror_path.replace("\\", "/").lstrip("/")
    scheme = _url_scheme(mirror)
    if scheme is None:
        base = os.path.expanduser(mirror)
        return os.path.join(base, rel) if rel else base
    if scheme not in _URL_SCHEMES:
        raise ValueError(
            f"unsupported mirror scheme {scheme!r} in {mirror!r} (use a folder, file://, http:// or https://)"
        )
    if not rel:
        return mirror
    return mirror.rstrip("/") + "/" + urllib.parse.quote(rel, safe="/")


def _local_path(source: str) -> Path | None:
    """Return the filesystem path for a plain path or file:// URL, None for http(s)."""
    scheme = _url_scheme(source)
    if scheme is None:
        return Path(os.path.expanduser(source))
    if scheme == "file":
        parsed = urllib.parse.urlparse(source)
        if parsed.netloc not in ("", "localhost"):
            raise _FatalError(f"unsupported file URL host {parsed.netloc!r}")
        return Path(urllib.request.url2pathname(parsed.path))
    if scheme in ("http", "https"):
        return None
    raise _FatalError(f"unsupported URL scheme {scheme!r}")


# --------------------------------------------------------------------------- helpers


def md5sum(path: str | Path, chunk_size: int = _CHUNK) -> str:
    """Return the lower-case hex md5 of a file, read in chunks to bound memory."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _normalise_md5(md5: str | Sequence[str] | None) -> list[str] | None:
    """Turn the md5 argument into a list of lower-case hex digests (or None)."""
    if md5 is None:
        return None
    items = [md5] if isinstance(md5, str) else list(md5)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"md5 must be a hex string or a list of them, got {item!r}")
        h = item.strip().lower()
        if len(h) != 32 or any(c not in "0123456789abcdef" for c in h):
            raise ValueError(f"not an md5 hex digest: {item!r}")
        out.append(h)
    if not out:
        raise ValueError("md5 list is empty; pass None to skip the check")
    return out


# --------------------------------------------------------------------------- fetch


@contextmanager
def _open_http(url: str, timeout: float) -> Iterator[tuple[BinaryIO, int | None]]:
    """Open *url*, yielding (response, content_length); classify failures.

    4xx other than 429 raise _FatalError; 5xx, 429 and network errors
    raise _TransientError (retried by the caller).
    """
    req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 429 or e.code >= 500:
            raise _TransientError(f"HTTP {e.code} {e.reason}") from e
        raise _FatalError(f"HTTP {e.code} {e.reason}") from e
    except (OSError, http.client.HTTPException) as e:
        raise _TransientError(f"{type(e).__name__}: {e}") from e
    with resp:
        length: int | None = None
        header = resp.headers.get("Content-Length")
        if header is not None:
            try:
                length = int(header)
            except ValueError:
                length = None
        yield resp, length


def _read_network(resp: BinaryIO, n: int, started: float, timeout: float) -> bytes:
    """Up to *n* bytes, as soon as some arrive (``read1``: a full chunk of a trickle would
    never let the deadline be checked); past the attempt's deadline, a transient error."""
    if time.monotonic() - started > timeout:
        raise _TransientError(f"took longer than download.timeout ({timeout:g} s) in all")
    try:
        return resp.read1(n)
    except (OSError, http.client.HTTPException) as e:
        raise _TransientError(f"{type(e).__name__}: {e}") from e


def _stream_once(
    source: str,
    local: Path | None,
    dest: Path,
    timeouts: tuple[float, float],
    progress: bool,
) -> tuple[Path, str, int]:
    """One attempt: stream *source* into a new temp file next to *dest*; a network attempt
    ends at its deadline (``timeouts``: the whole attempt's, and a connect or read's).

    Returns (temp_path, md5_hex, n_bytes).  On any exception the temp file is
    removed before the exception propagates.
    """
    started = time.monotonic()
    timeout, read_timeout = timeouts
    tmp = unique_sibling(dest.parent, f".{dest.name}.part-", create_file)
    try:
        h = hashlib.md5(usedforsecurity=False)
        n = 0
        with (
            open(tmp, "wb") as out,
            _open_source(source, local, dest, min(timeout, read_timeout)) as (src, total),
        ):
            read = src.read if local is not None else partial(_read_network, src, started=started, timeout=timeout)
            with tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                mininterval=2.0,
                desc=dest.name,
                disable=not progress,
                file=sys.stderr,
            ) as bar:
                while chunk := read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    n += len(chunk)
                    bar.update(len(chunk))
            if total is not None and n < total:
                raise _TransientError(f"truncated: got {n} of {total} bytes")
            out.flush()
            os.fsync(out.fileno())
        return tmp, h.hexdigest(), n
    except BaseException:
        remove_quietly(tmp)
        raise


@contextmanager
def _open_source(source: str, local: Path | None, dest: Path, timeout: float) -> Iterator[tuple[BinaryIO, int | None]]:
    if local is None:
        with _open_http(source, timeout) as pair:
            yield pair
        return
    try:
        f = open(local, "rb")  # noqa: SIM115 - closed by the with below
    except FileNotFoundError as e:
        raise _FatalError("source file not found") from e
    except IsADirectoryError as e:
        raise _FatalError("source is a directory, not a file") from e
    with f:
        yield f, os.fstat(f.fileno()).st_size


@contextmanager
def open_stream(source: str, timeout: float = 60.0) -> Iterator[BinaryIO]:
    """A binary stream of *source* (path, ``file://`` or ``http(s)://``), for readers that
    take only a prefix of a large file (a preset streaming the first N DPR passages) and so
    cannot verify a whole-file checksum. HTTP and file errors raise :class:`DownloadError`
    naming the source."""
    try:
        local = _local_path(source)
        with _open_source(source, local, Path("."), timeout) as (stream, _):
            yield stream
    except (_FatalError, _TransientError) as e:
        raise DownloadError(f"{source}: {e}") from e


def _publish(tmp: Path, dest: Path, source: str, expected: list[str] | None, actual: str) -> None:
    """Rename the attempt's file onto *dest* if its md5 is accepted; else remove it."""
    try:
        if expected is not None and actual not in expected:
            raise ChecksumError(source, dest, expected, actual)
        os.replace(tmp, dest)
    except BaseException:
        remove_quietly(tmp)
        raise
    fsync_dir(dest.parent)


def fetch(
    source: str,
    dest: str | Path,
    md5: str | Sequence[str] | None,
    *,
    retries: int = schema.default("download", "retries"),
    timeout: float = schema.default("download", "timeout"),
    read_timeout: float = schema.default("download", "read_timeout"),
    backoff: float = 2.0,
    progress: bool = True,
    on_verified: Callable[[str], None] | None = None,
) -> Path:
    """Download *source* (http/https, file:// or a local path) to *dest* atomically.

    Writes to ``.{dest.name}.part-XXXXXXXX`` beside *dest*, hashing while
    streaming, and ``os.replace``s it onto *dest* only after the size and md5
    are verified, so Snakemake never sees a partial file.  *md5* is one hex
    digest or a list of accepted ones (case-insensitive); None skips the check
    with a warning.  HTTP 5xx/429, network errors, timeouts and truncated bodies
    are retried: ``retries`` is the number of *extra* attempts (``retries+1``
    requests at most), sleeping ``backoff * 2**i`` seconds before retry ``i``.
    An HTTP attempt may take *timeout* seconds in all (``download.timeout``,
    however steadily bytes trickle in) and wait *read_timeout* seconds at most
    to connect or for more bytes.  Other HTTP errors (404, 403, ...), missing
    local files and md5 mismatches fail at once.  On any failure,
    KeyboardInterrupt included, the temp file is removed and *dest* is left as
    it was.  *on_verified* is called with the file's md5 once it is in place.
    Returns *dest* as a Path.
    """
    dest = Path(dest)
    expected = _normalise_md5(md5)
    if retries < 0:
        raise ValueError("retries must be >= 0")
    try:
        local = _local_path(source)
    except _FatalError as e:
        raise DownloadError(f"failed to fetch {source} -> {dest}: {e}") from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    if expected is None:
        logger.warning("no md5 given for %s; its content will not be verified", source)
    logger.info("fetching %s -> %s", source, dest)

    attempts = 1 if local is not None else retries + 1
    last: _TransientError | None = None
    for attempt in range(attempts):
        if attempt:
            delay = backoff * 2 ** (attempt - 1)
            logger.warning(
                "attempt %d/%d for %s failed (%s); retrying in %.1f s",
                attempt,
                attempts,
                source,
                last,
                delay,
            )
            time.sleep(delay)
        try:
            tmp, actual, size = _stream_once(source, local, dest, (timeout, read_timeout), progress)
        except _TransientError as e:
            last = e
            continue
        except _FatalError as e:
            raise DownloadError(f"failed to fetch {source} -> {dest}: {e}") from e
        except OSError as e:  # local read/write errors (disk full, permissions): final
            raise DownloadError(f"failed to fetch {source} -> {dest}: {e}") from e

        _publish(tmp, dest, source, expected, actual)
        verified = "verified" if expected else "NOT verified"
        logger.info("fetched %s -> %s (%d bytes, md5 %s, %s)", source, dest, size, actual, verified)
        if on_verified is not None:
            on_verified(actual)
        return dest

    raise DownloadError(f"failed to fetch {source} -> {dest} after {attempts} attempt(s): {last}") from last
