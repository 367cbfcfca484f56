"""DPR's Wikipedia passages (``psgs_w100.tsv``, gzip or plain): parsed with csv quoting from a
path or a stream, and a prefix of the first N passages streamed to a local TSV with its
sha256 (a prefix cannot be checked against the whole file's checksum).

Design notes: docs/llara.md.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
from collections.abc import Callable, Iterator
from os import PathLike
from pathlib import Path
from typing import IO, Any

from llmret.atomic_files import atomic_publish, file_sha256

DPR_HEADER = ["id", "text", "title"]
# A DPR passage is 100 words; this only bounds the damage of an unterminated quote.
DPR_FIELD_LIMIT = 1 << 24


def _text_source(source: PathLike | IO[bytes]) -> tuple[io.TextIOWrapper, str, Callable[[], None]]:
    """(text stream, name for messages, release). Gzip is recognised by its magic bytes.

    ``release`` closes what we opened, but only detaches from a caller's stream: the caller
    owns it (closing a wrapper would otherwise close the stream underneath).
    """
    if isinstance(source, (str, os.PathLike)):
        raw: IO[bytes] = open(source, "rb")
        name, owned = str(source), True
    else:
        raw, name, owned = source, str(getattr(source, "name", "<stream>")), False
    wrapped = not hasattr(raw, "peek")
    buffered = io.BufferedReader(raw) if wrapped else raw  # type: ignore[arg-type]
    binary = gzip.GzipFile(fileobj=buffered, mode="rb") if buffered.peek(2)[:2] == b"\x1f\x8b" else buffered
    text = io.TextIOWrapper(binary, encoding="utf-8", newline="")

    def release() -> None:
        if owned:
            text.close()
            raw.close()
            return
        text.detach()
        if wrapped:
            buffered.detach()

    return text, name, release


def iter_dpr_passages(
    source: PathLike | IO[bytes], max_passages: int | None = None
) -> Iterator[tuple[int, str, str, str]]:
    """(line, id, text, title) of each passage in DPR's ``psgs_w100.tsv(.gz)``, in file order.

    ``source`` is a path or an open binary stream (e.g. an HTTP response body, so the 4.7 GB
    file is read once without being stored); gzip is detected from the content. The file is
    TSV with header ``id text title`` and csv quoting (text in double quotes, ``""`` inside),
    so it is parsed with :mod:`csv`, never split on tabs. Reading stops after
    ``max_passages`` passages. A malformed line raises ValueError naming the file and line.
    """
    if max_passages is not None and max_passages < 0:
        raise ValueError(f"max_passages must be >= 0, got {max_passages}")
    csv.field_size_limit(max(csv.field_size_limit(), DPR_FIELD_LIMIT))
    text_stream, name, release = _text_source(source)
    try:
        # Not strict, like DPR's own reader: a stray quote inside a title is kept, not fatal.
        reader = csv.reader(text_stream, delimiter="\t", quotechar='"')
        read = 0
        while max_passages is None or read < max_passages:
            lineno = reader.line_num + 1  # first physical line of the next record
            try:
                row = next(reader, None)
            except (csv.Error, UnicodeDecodeError) as e:
                raise ValueError(f"{name}:{lineno}: malformed DPR line ({e})") from None
            if row is None:
                if lineno == 1:
                    raise ValueError(f"{name}: empty, expected header {DPR_HEADER}")
                break
            if lineno == 1:
                if [c.strip() for c in row] != DPR_HEADER:
                    raise ValueError(f"{name}:1: expected header {DPR_HEADER}, got {row[:4]!r}")
                continue
            if not row:  # blank line
                continue
            if len(row) != 3:
                raise ValueError(f"{name}:{lineno}: expected 3 tab-separated fields (id, text, title), got {len(row)}")
            pid, text, title = (c.strip() for c in row)
            if not pid:
                raise ValueError(f"{name}:{lineno}: empty passage id")
            read += 1
            yield lineno, pid, text, title
    finally:
        release()


def fetch_dpr_prefix(source: str, out_path: PathLike, max_passages: int, timeout: float = 60.0) -> dict[str, Any]:
    """Stream the first ``max_passages`` passages of DPR's Wikipedia file from ``source`` (URL,
    ``file://`` or path; gzip or plain) into a plain TSV at ``out_path``, without
    downloading the rest.

    A prefix cannot be checked against the whole file's published checksum, so the sha256
    of what was written is returned (the workflow records it next to the file); the TSV is
    re-parsed by :func:`iter_dpr_passages` like the original. Written atomically: a failed
    or interrupted stream leaves nothing.
    """
    from llmret.data.download import open_stream

    if max_passages < 1:
        raise ValueError(f"max_passages must be >= 1, got {max_passages}")

    def write(tmp: Path) -> None:
        with open_stream(source, timeout) as stream, open(tmp, "w", encoding="utf-8", newline="") as out:
            writer = csv.writer(out, delimiter="\t", quotechar='"', lineterminator="\n")
            writer.writerow(DPR_HEADER)
            n = 0
            for _, pid, text, title in iter_dpr_passages(stream, max_passages):
                writer.writerow([pid, text, title])
                n += 1
            if n < max_passages:
                raise ValueError(f"{source}: holds {n} passages, fewer than max_passages={max_passages}")

    atomic_publish(write, out_path)
    return {
        "source": source,
        "passages": max_passages,
        "sha256": file_sha256(Path(out_path)),
        "note": "first passages streamed; the whole file's checksum does not apply to a prefix",
    }
