"""A BEIR folder from raw files: MS MARCO's official TSVs and TREC qrels.

MS MARCO passage ships as ``collection.tsv`` (``pid<TAB>text``), ``queries.*.tsv``
(``qid<TAB>text``) and qrels in TREC's four columns (``qid iter pid grade``), some inside
``collectionandqueries.tar.gz``, the TREC DL topics as ``.tsv.gz`` and their judgments as
``.txt``. :func:`assemble` turns such files into the layout every later stage reads
(``corpus.jsonl``, ``queries.jsonl`` with every split's queries, ``qrels/{split}.tsv``),
streaming, so the 8.8M-passage collection never sits in memory.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from llmret.atomic_files import remove_quietly, unique_sibling
from llmret.data.archives import swap_into_place
from llmret.data.beir import BeirFormatError, decoded_lines

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawFile:
    """A downloaded file (``path``), or one ``member`` inside it when it is a tar archive.
    Names ending in ``.gz`` (the file or the member) are decompressed while reading."""

    path: Path
    member: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path}:{self.member}" if self.member else str(self.path)


@contextlib.contextmanager
def open_lines(f: RawFile) -> Iterator[Iterator[tuple[int, str]]]:
    """The file's numbered text lines, streamed; a missing member is an error naming the
    archive, a byte that is not UTF-8 names file:line."""
    with contextlib.ExitStack() as stack:
        if f.member is None:
            raw: IO[bytes] = stack.enter_context(open(f.path, "rb"))
            inner_name = f.path.name
        else:
            try:
                tar = stack.enter_context(tarfile.open(f.path, "r:*"))
                info = tar.getmember(f.member)
            except KeyError:
                raise BeirFormatError(f"{f.path}: has no member {f.member!r}") from None
            except tarfile.TarError as e:
                raise BeirFormatError(f"{f.path}: not a readable tar archive ({e})") from e
            if not info.isfile():
                raise BeirFormatError(f"{f.path}: member {f.member!r} is not a regular file")
            copies = sum(os.path.normpath(m.name) == os.path.normpath(f.member) for m in tar.getmembers())
            if copies > 1:  # getmember gives the last: refused rather than let it silently win
                raise BeirFormatError(f"{f.path}: member {f.member!r} is in the archive {copies} times")
            raw = stack.enter_context(tar.extractfile(info))
            inner_name = f.member
        if inner_name.endswith(".gz"):
            raw = stack.enter_context(gzip.open(raw, "rb"))
        yield decoded_lines(f.name, raw)


def read_tsv(f: RawFile) -> Iterator[tuple[str, str]]:
    """``(id, text)`` pairs of an ``id<TAB>text`` file; anything else names file:line."""
    with open_lines(f) as lines:
        for n, line in lines:
            line = line.rstrip("\n").rstrip("\r")
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip():
                raise BeirFormatError(f"{f.name}:{n}: expected 'id<TAB>text', got {len(parts)} field(s)")
            yield parts[0].strip(), parts[1]


def read_trec_qrels(f: RawFile) -> Iterator[tuple[str, str, int]]:
    """``(query_id, doc_id, grade)`` of a TREC qrels file (``qid iter docid grade``,
    whitespace-separated; MS MARCO's dev qrels use tabs, NIST's use spaces)."""
    with open_lines(f) as lines:
        for n, line in lines:
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4:
                raise BeirFormatError(f"{f.name}:{n}: expected 4 columns 'qid iter docid grade', got {len(parts)}")
            try:
                grade = int(parts[3])
            except ValueError:
                raise BeirFormatError(f"{f.name}:{n}: grade {parts[3]!r} is not an integer") from None
            yield parts[0], parts[2], grade


@dataclass(frozen=True)
class Split:
    queries: RawFile
    qrels: RawFile


def assemble(corpus: RawFile, splits: Mapping[str, Split], target: str | Path) -> dict:
    """Write the BEIR folder ``target`` (atomically: built beside it, renamed at the end).

    A query id given different texts by two splits, or a (query, document) pair judged
    twice with different grades, is an error; every split's queries go to one
    ``queries.jsonl`` as in BEIR. Returns counts for the log."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_sibling(target.parent, f".{target.name}.assemble-", lambda p: p.mkdir())
    try:
        counts: dict = {"documents": 0, "queries": 0, "splits": {}}
        seen_docs: set[str] = set()
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as out:
            for doc_id, text in read_tsv(corpus):
                if doc_id in seen_docs:
                    raise BeirFormatError(f"{corpus.name}: document id {doc_id!r} appears twice")
                seen_docs.add(doc_id)
                out.write(json.dumps({"_id": doc_id, "title": "", "text": text}, ensure_ascii=False) + "\n")
        counts["documents"] = len(seen_docs)
        del seen_docs
        queries: dict[str, str] = {}
        (tmp / "qrels").mkdir()
        for split, files in splits.items():
            n_queries = 0
            for qid, text in read_tsv(files.queries):
                if queries.setdefault(qid, text) != text:
                    raise BeirFormatError(f"{files.queries.name}: query {qid!r} has another text in an earlier split")
                n_queries += 1
            grades: dict[tuple[str, str], int] = {}
            for qid, doc_id, grade in read_trec_qrels(files.qrels):
                if grades.setdefault((qid, doc_id), grade) != grade:
                    raise BeirFormatError(f"{files.qrels.name}: ({qid}, {doc_id}) judged twice, different grades")
            with open(tmp / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as out:
                out.write("query-id\tcorpus-id\tscore\n")
                for (qid, doc_id), grade in grades.items():
                    out.write(f"{qid}\t{doc_id}\t{grade}\n")
            counts["splits"][split] = {
                "queries": n_queries,
                "judged_queries": len({q for q, _ in grades}),
                "judgments": len(grades),
            }
        with open(tmp / "queries.jsonl", "w", encoding="utf-8") as out:
            for qid, text in queries.items():
                out.write(json.dumps({"_id": qid, "text": text}, ensure_ascii=False) + "\n")
        counts["queries"] = len(queries)
        swap_into_place(tmp, target)
    except BaseException:
        remove_quietly(tmp)
        raise
    return counts
