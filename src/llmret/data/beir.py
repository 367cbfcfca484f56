"""Read, validate, subsample and write datasets in the BEIR layout.

A BEIR dataset is a folder with ``corpus.jsonl`` (``_id``, ``title``, ``text``),
``queries.jsonl`` (``_id``, ``text``) and ``qrels/{split}.tsv`` (``query-id``,
``corpus-id``, ``score`` with a header line). Every later stage trusts what this module
returns, so malformed input stops here with the file and line that is wrong.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmret.atomic_files import atomic_write

log = logging.getLogger(__name__)

QRELS_HEADER = ("query-id", "corpus-id", "score")
ON_UNKNOWN = ("error", "drop")


class BeirFormatError(ValueError):
    """A BEIR file breaks the format; the message names the file and line."""


@dataclass
class Corpus:
    """Documents in file order; parallel lists keep millions of passages compact."""

    ids: list[str] = field(default_factory=list)
    titles: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def contents(self) -> list[str]:
        """Title and text joined by a space, as BEIR's and Pyserini's baselines index them."""
        return [join_title(t, x) for t, x in zip(self.titles, self.texts, strict=True)]

    def subset(self, keep: set[str]) -> Corpus:
        out = Corpus()
        for i, t, x in zip(self.ids, self.titles, self.texts, strict=True):
            if i in keep:
                out.ids.append(i)
                out.titles.append(t)
                out.texts.append(x)
        return out


Queries = dict[str, str]
Qrels = dict[str, dict[str, int]]


@dataclass
class Dataset:
    corpus: Corpus
    queries: Queries
    qrels: Qrels


@dataclass
class Subsample:
    """How a preset shrinks a dataset; recorded in ``dataset.json`` and the table metadata."""

    max_queries: int | None = None
    max_docs: int | None = None
    seed: int = 13

    @property
    def active(self) -> bool:
        return self.max_queries is not None or self.max_docs is not None


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of a UTF-8 file, plain or gzip; bytes that are not
    UTF-8 fail naming ``file:line`` and the byte, never as a bare ``UnicodeDecodeError``."""
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    with gzip.open(path, "rb") if gzipped else open(path, "rb") as f:
        yield from decoded_lines(path, f)


def decoded_lines(name: str | Path, raw: Iterable[bytes]) -> Iterator[tuple[int, str]]:
    """(line number, text) of a binary stream's lines, decoded as UTF-8 one line at a time, so
    a bad byte names ``file:line`` and its column."""
    for lineno, line in enumerate(raw, start=1):
        try:
            yield lineno, line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BeirFormatError(
                f"{name}:{lineno}: not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}: {e.reason})"
            ) from None


def jsonl_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file, plain or gzip (released
    training files often are); a line that is not a JSON object fails naming ``file:line``."""
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            reason = e.msg.removesuffix(" at")  # the stdlib's message ends in "at" before its position
            raise BeirFormatError(f"{path}:{lineno}: invalid JSON at column {e.colno}: {reason}") from None
        if not isinstance(rec, dict):
            raise BeirFormatError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        if "\\u" in line:  # only an escape can make a lone surrogate (half a UTF-16 pair)
            _refuse_lone_surrogates(rec, path, lineno)
        yield lineno, rec


def _refuse_lone_surrogates(rec: dict, path: str | Path, lineno: int) -> None:
    try:  # "\\ud800" is valid JSON but not Unicode text: no UTF-8 file can hold it
        json.dumps(rec, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise BeirFormatError(f"{path}:{lineno}: a lone surrogate {e.object[e.start]!r} is not text") from None


def _id_of(rec: dict, path: Path, lineno: int) -> str:
    if "_id" not in rec:
        raise BeirFormatError(f"{path}:{lineno}: record has no '_id'")
    doc_id = rec["_id"]
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise BeirFormatError(f"{path}:{lineno}: '_id' must be a non-empty string, got {doc_id!r}")
    if any(c.isspace() for c in doc_id):
        # TREC run and qrels files are whitespace separated: such an id cannot round-trip.
        raise BeirFormatError(f"{path}:{lineno}: '_id' {doc_id!r} contains white space")
    return doc_id


def _text_field(rec: dict, key: str, path: Path, lineno: int, required: bool) -> str:
    value = rec.get(key)
    if value is None:
        if required:
            raise BeirFormatError(f"{path}:{lineno}: record has no '{key}'")
        return ""
    if not isinstance(value, str):
        raise BeirFormatError(f"{path}:{lineno}: '{key}' must be a string, got {type(value).__name__}")
    return value


def join_title(title: str, text: str) -> str:
    """Title and text joined by a space, as BEIR's and Pyserini's baselines index them."""
    return f"{title} {text}" if title else text


def _unique_records(path: Path, what: str) -> Iterator[tuple[int, str, dict]]:
    """``(line, id, record)`` per JSONL record; a repeated id names both lines."""
    first_line: dict[str, int] = {}
    for lineno, rec in jsonl_records(path):
        rec_id = _id_of(rec, path, lineno)
        if rec_id in first_line:
            raise BeirFormatError(
                f"{path}:{lineno}: duplicate {what} id {rec_id!r} (first on line {first_line[rec_id]})"
            )
        first_line[rec_id] = lineno
        yield lineno, rec_id, rec


def iter_corpus(path: str | Path, check_ids: bool = True) -> Iterator[tuple[str, str, str]]:
    """Stream validated ``(id, title, text)`` records: corpora may not fit in memory.
    ``check_ids`` refuses a repeated id, remembering every id read (memory that grows with
    the corpus); a reader of a corpus already checked whole may skip it."""
    path = Path(path)
    records = (
        _unique_records(path, "document")
        if check_ids
        else ((lineno, _id_of(rec, path, lineno), rec) for lineno, rec in jsonl_records(path))
    )
    for lineno, doc_id, rec in records:
        yield (
            doc_id,
            _text_field(rec, "title", path, lineno, required=False),
            _text_field(rec, "text", path, lineno, required=True),
        )


def load_corpus(path: str | Path) -> Corpus:
    """The whole corpus. A document with neither title nor text is kept (judgments may name
    it; it matches nothing) and counted in a warning; an empty file is an error."""
    corpus = Corpus()
    empty = []
    for doc_id, title, text in iter_corpus(path):
        corpus.ids.append(doc_id)
        corpus.titles.append(title)
        corpus.texts.append(text)
        if not (title.strip() or text.strip()):
            empty.append(doc_id)
    if not corpus.ids:
        raise BeirFormatError(f"{path}: corpus is empty (no document)")
    if empty:
        log.warning("%s: %d documents have neither title nor text (kept; e.g. %s)", path, len(empty), empty[:3])
    return corpus


def corpus_rows(path: str | Path, start: int, end: int) -> Corpus:
    """Documents ``start <= i < end`` of a prepared corpus (one encode shard), read no further.
    Ids are not checked for repeats here: the prepared copy was checked whole when written,
    and remembering every id would grow with the corpus, not the shard."""
    path = Path(path)
    out = Corpus()
    for i, (lineno, rec) in enumerate(jsonl_records(path)):
        if i >= end:
            break
        if i >= start:
            out.ids.append(_id_of(rec, path, lineno))
            out.titles.append(_text_field(rec, "title", path, lineno, required=False))
            out.texts.append(_text_field(rec, "text", path, lineno, required=True))
    if len(out) != end - start:
        raise BeirFormatError(f"{path}: rows {start}-{end} asked for, the corpus ends after {start + len(out)}")
    return out


def load_queries(path: str | Path) -> Queries:
    """Every query; one with an empty text (nothing to search with) or an empty file is an error."""
    path = Path(path)
    queries = {}
    for lineno, qid, rec in _unique_records(path, "query"):
        text = _text_field(rec, "text", path, lineno, required=True)
        if not text.strip():
            raise BeirFormatError(f"{path}:{lineno}: query {qid!r} has an empty text")
        queries[qid] = text
    if not queries:
        raise BeirFormatError(f"{path}: no queries")
    return queries


def load_qrels(path: str | Path) -> Qrels:
    """Read a BEIR qrels TSV (header required); a repeated pair is an error, not a silent overwrite."""
    path = Path(path)
    qrels: Qrels = {}
    lines = text_lines(path)
    _, first = next(lines, (1, ""))
    header = first.rstrip("\r\n").split("\t")
    if tuple(h.strip() for h in header) != QRELS_HEADER:
        expected = "\t".join(QRELS_HEADER)
        raise BeirFormatError(f"{path}:1: expected header {expected!r}, got {header!r}")
    for lineno, line in lines:
        if not line.strip():
            continue
        cols = line.rstrip("\n").split("\t")
        if len(cols) != 3:
            raise BeirFormatError(f"{path}:{lineno}: expected 3 tab-separated columns, got {len(cols)}")
        qid, did, score = (c.strip() for c in cols)
        if not qid or not did:
            raise BeirFormatError(f"{path}:{lineno}: empty query or document id")
        try:
            rel = int(score)
        except ValueError:
            raise BeirFormatError(f"{path}:{lineno}: relevance {score!r} is not an integer") from None
        if did in qrels.setdefault(qid, {}):
            raise BeirFormatError(f"{path}:{lineno}: pair ({qid}, {did}) judged twice")
        qrels[qid][did] = rel
    if not qrels:
        raise BeirFormatError(f"{path}: no judgments")
    return qrels


def load_dataset(folder: str | Path, split: str = "test", on_unknown: str = "error") -> Dataset:
    """Load and cross-check a BEIR folder; keep only queries judged in ``split``.

    ``on_unknown`` says what to do with judgments naming a query or document that does not
    exist: ``error`` (default) stops with the qrels file named, ``drop`` removes them and logs
    how many went.
    """
    if on_unknown not in ON_UNKNOWN:
        raise ValueError(f"on_unknown must be one of {ON_UNKNOWN}, got {on_unknown!r}")
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for p in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not p.is_file():
            raise FileNotFoundError(f"BEIR dataset {folder}: missing {p.relative_to(folder)}")
    corpus = load_corpus(folder / "corpus.jsonl")
    queries = load_queries(folder / "queries.jsonl")
    qrels = load_qrels(qrels_path)

    doc_ids = set(corpus.ids)
    unknown_q = sorted(q for q in qrels if q not in queries)
    unknown_d = sorted({d for judged in qrels.values() for d in judged if d not in doc_ids})
    if unknown_q or unknown_d:
        what = []
        if unknown_q:
            what.append(f"{len(unknown_q)} unknown query ids (e.g. {unknown_q[:3]})")
        if unknown_d:
            what.append(f"{len(unknown_d)} unknown document ids (e.g. {unknown_d[:3]})")
        msg = f"{qrels_path}: judgments name " + " and ".join(what)
        if on_unknown == "error":
            raise BeirFormatError(msg + "; set the dataset's on_unknown_qrels: drop to skip them")
        dropped = 0
        for q in list(qrels):
            if q not in queries:
                dropped += len(qrels.pop(q))
                continue
            for d in [d for d in qrels[q] if d not in doc_ids]:
                del qrels[q][d]
                dropped += 1
            if not qrels[q]:
                del qrels[q]
        log.warning("%s; dropped %d judgments", msg, dropped)

    queries = {q: queries[q] for q in queries if q in qrels}
    if not queries:
        raise BeirFormatError(f"{qrels_path}: no query of split {split!r} is left with a judgment")
    return Dataset(corpus=corpus, queries=queries, qrels=qrels)


def subsample(ds: Dataset, spec: Subsample) -> Dataset:
    """Shrink a dataset for quick runs, deterministically, keeping every judged document.

    Queries are sampled first; the corpus keeps all documents judged for the kept queries
    and fills up to ``max_docs`` with a random sample of the rest (so the retrieval task is
    still a search among distractors, only smaller).
    """
    if not spec.active:
        return ds
    rng = random.Random(spec.seed)
    qids = sorted(ds.queries)
    if spec.max_queries is not None and spec.max_queries < len(qids):
        qids = sorted(rng.sample(qids, spec.max_queries))
    qrels = {q: ds.qrels[q] for q in qids}
    judged = {d for q in qids for d in qrels[q]}
    keep = set(judged)
    if spec.max_docs is not None:
        rest = [d for d in ds.corpus.ids if d not in judged]
        room = max(0, spec.max_docs - len(judged))
        keep.update(rng.sample(rest, min(room, len(rest))))
    else:
        keep = set(ds.corpus.ids)
    return Dataset(corpus=ds.corpus.subset(keep), queries={q: ds.queries[q] for q in qids}, qrels=qrels)


def stats(ds: Dataset) -> dict:
    n_judg = sum(len(v) for v in ds.qrels.values())
    return {"documents": len(ds.corpus), "queries": len(ds.queries), "judgments": n_judg}


def _write_queries_qrels(ds: Dataset, folder: Path) -> None:
    def queries(f):
        for q, text in ds.queries.items():
            f.write(json.dumps({"_id": q, "text": text}, ensure_ascii=False) + "\n")

    def qrels(f):
        f.write("\t".join(QRELS_HEADER) + "\n")
        for q, judged in ds.qrels.items():
            for d, rel in judged.items():
                f.write(f"{q}\t{d}\t{rel}\n")

    atomic_write(folder / "queries.jsonl", queries)
    atomic_write(folder / "qrels.tsv", qrels)


def write_dataset(ds: Dataset, folder: str | Path, meta: dict | None = None) -> None:
    """Write ``corpus.jsonl``, ``queries.jsonl``, ``qrels.tsv`` (BEIR formats) and
    ``dataset.json`` (counts and how the copy was made) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def corpus(f):
        for i, t, x in zip(ds.corpus.ids, ds.corpus.titles, ds.corpus.texts, strict=True):
            f.write(json.dumps({"_id": i, "title": t, "text": x}, ensure_ascii=False) + "\n")

    atomic_write(folder / "corpus.jsonl", corpus)
    _write_queries_qrels(ds, folder)
    info = {**stats(ds), **(meta or {})}
    atomic_write(folder / "dataset.json", lambda f: json.dump(info, f, indent=2))


def subsample_record(spec: Subsample, before: Dataset, after: Dataset) -> dict:
    return {"subsample": asdict(spec) if spec.active else None, "original": stats(before)}


@dataclass(frozen=True)
class TrainSplit:
    """A labelled training split of a BEIR folder (``datasets.{name}.train``)."""

    split: str = "train"
    max_queries: int | None = None  # a seeded sample of the queries with a positive, for presets
    seed: int = 13

    def __post_init__(self) -> None:
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1, got {self.max_queries}")


def prepare_train_split(folder: str | Path, spec: TrainSplit, eval_split: str, out_dir: str | Path) -> dict:
    """Training queries and their positives, checked and written as ``queries.jsonl``,
    ``qrels.tsv`` and ``split.json`` in ``out_dir``.

    Only judgments with a grade above 0 are kept (they are the positives; negatives come from
    mining). Every judged document must exist in the corpus and every judged query in the
    queries file. A query that is also judged in the evaluation split is an error: training
    on it would leak test labels into the table.
    """
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{spec.split}.tsv"
    eval_path = folder / "qrels" / f"{eval_split}.tsv"
    for p in (folder / "corpus.jsonl", folder / "queries.jsonl", qrels_path):
        if not p.is_file():
            raise FileNotFoundError(f"BEIR dataset {folder}: missing {p.relative_to(folder)} (training split)")
    qrels = load_qrels(qrels_path)
    positives = {q: {d: r for d, r in judged.items() if r > 0} for q, judged in qrels.items()}
    positives = {q: judged for q, judged in positives.items() if judged}
    if not positives:
        raise BeirFormatError(f"{qrels_path}: no judgment with a grade above 0")
    queries = load_queries(folder / "queries.jsonl")
    unknown_q = sorted(q for q in positives if q not in queries)
    if unknown_q:
        raise BeirFormatError(f"{qrels_path}: {len(unknown_q)} query ids not in queries.jsonl (e.g. {unknown_q[:3]})")
    needed = {d for judged in positives.values() for d in judged}
    found = {doc_id for doc_id, _, _ in iter_corpus(folder / "corpus.jsonl") if doc_id in needed}
    missing = sorted(needed - found)
    if missing:
        raise BeirFormatError(
            f"{qrels_path}: {len(missing)} positive document ids not in corpus.jsonl (e.g. {missing[:3]})"
        )
    if eval_path.is_file() and eval_path != qrels_path:
        overlap = sorted(set(positives) & set(load_qrels(eval_path)))
        if overlap:
            raise BeirFormatError(
                f"{qrels_path}: {len(overlap)} training queries are judged in the evaluation split {eval_path} "
                f"too (e.g. {overlap[:3]}); training on them would leak test labels"
            )
    qids = sorted(positives)
    if spec.max_queries is not None and spec.max_queries < len(qids):
        qids = sorted(random.Random(spec.seed).sample(qids, spec.max_queries))
    kept = Dataset(corpus=Corpus(), queries={q: queries[q] for q in qids}, qrels={q: positives[q] for q in qids})
    info = {
        "split": spec.split,
        "queries": len(qids),
        "positives": sum(len(kept.qrels[q]) for q in qids),
        "original": {"queries": len(positives), "positives": sum(len(j) for j in positives.values())},
        "subsample": asdict(spec) if spec.max_queries is not None else None,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_queries_qrels(kept, out_dir)
    atomic_write(out_dir / "split.json", lambda f: json.dump(info, f, indent=2))
    log.info("training split %s of %s: %s", spec.split, folder, info)
    return info
