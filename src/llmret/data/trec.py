"""TREC run and qrels files, in the plain formats trec_eval, ir_measures, pytrec_eval and ranx read.

A run is ``qid Q0 docid rank score tag``, six columns a line and nothing else. What it was
made with and what it must hold sit in its **record** beside it, ``<run>.json`` (for
``scifact.trec``, ``scifact.trec.json``): the settings (system, dataset, depth, the system's
settings), the number of queries and lines, the byte size and the sha256 of the run file.
:func:`read_run` and :func:`iter_run` check a run against its record, so a run cut short or
altered after it was written is an error naming the file, never a lower score.

Qrels are ``qid 0 docid grade`` (:func:`write_qrels`, :func:`read_qrels`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from llmret import atomic_files

log = logging.getLogger(__name__)

Run = dict[str, list[tuple[str, float]]]
Qrels = dict[str, dict[str, int]]
RECORD_FORMAT = "llmret-run-record/1"
RECORD_KEYS = ("format", "settings", "queries", "lines", "bytes", "sha256")
# Runs written before the records had their settings in a first line of this form; such a
# file with no record is still read (unchecked, with a warning).
HEADER_PREFIX = "# llmret-run "


class RunIntegrityError(ValueError):
    """A run file that its record does not describe, or that has no record to be checked by."""


def search_depth(top_k: int, ignore_identical_ids: bool) -> int:
    """How deep to search so that ``top_k`` results remain once a query's own id is dropped."""
    return top_k + 1 if ignore_identical_ids else top_k


def drop_identical_ids(run: Mapping[str, list[tuple[str, float]]], top_k: int) -> Run:
    """BEIR's evaluation convention (``ignore_identical_ids``; Pyserini's ``--remove-query``):
    a retrieved document whose id equals the query's is dropped, then each ranking is cut to
    ``top_k``. In ArguAna (and Quora) the queries are themselves corpus documents."""
    return {q: [(d, s) for d, s in ranked if d != q][:top_k] for q, ranked in run.items()}


def record_path(path: str | Path) -> Path:
    """Where the record of the run ``path`` lives: ``<run>.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def write_run(
    path: str | Path, run: Mapping[str, list[tuple[str, float]]], tag: str, header: dict | None = None
) -> dict:
    """Write the run and its record; return the record. ``header`` is the run's settings (what
    made it), kept in the record. Ties are broken by document id so files are reproducible;
    a query with an empty ranking has no line (the record counts it in ``empty_queries``).

    The run goes to a temporary file beside ``path`` (removed on any failure: a full disk, an
    error, an interrupt), then the record, then the run is renamed into place: a run and a
    record that agree are a complete run."""
    if any(c.isspace() for c in tag) or not tag:
        raise ValueError(f"run tag must be a non-empty word, got {tag!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            counts = _write_lines(f, run, tag)
            f.flush()
            os.fsync(f.fileno())
        record = {"format": RECORD_FORMAT, "file": path.name, "tag": tag, "settings": header or {}, **counts}
        atomic_files.atomic_write_text(record_path(path), json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return record


def _write_lines(f, run: Mapping[str, list[tuple[str, float]]], tag: str) -> dict:
    """Each query's ranking, best first, as one block of lines; the counts and sha256 of what was written."""
    digest, lines, size, queries, empty = hashlib.sha256(), 0, 0, 0, 0
    for qid in sorted(run):
        if not qid or any(c.isspace() for c in qid):
            raise ValueError(f"query id {qid!r} cannot be written to a TREC run (empty or with whitespace)")
        ranked = sorted(run[qid], key=lambda x: (-x[1], x[0]))
        if not ranked:
            empty += 1
            continue
        block = "".join(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n" for rank, (doc, score) in enumerate(ranked, 1))
        data = block.encode("utf-8")
        f.write(data)
        digest.update(data)
        lines, size, queries = lines + len(ranked), size + len(data), queries + 1
    return {"queries": queries, "empty_queries": empty, "lines": lines, "bytes": size, "sha256": digest.hexdigest()}


def read_record(path: str | Path) -> dict:
    """The record of the run ``path``; an error naming the record when it is missing or broken."""
    rec = record_path(path)
    try:
        record = json.loads(rec.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunIntegrityError(
            f"{path}: no record {rec.name} beside it, so whether the run is complete cannot be checked; "
            "rerun the search that writes it"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunIntegrityError(
            f"{rec}: not a readable run record ({e}); rerun the search that writes {path}"
        ) from None
    missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise RunIntegrityError(f"{rec}: not a {RECORD_FORMAT} record (no {', '.join(missing)})")
    if record["format"] != RECORD_FORMAT:
        raise RunIntegrityError(f"{rec}: format {record['format']!r}, this code reads {RECORD_FORMAT}")
    return record


class _Tally:
    """What a reading of a run saw (bytes hashed, ranking lines, queries), to hold against its record."""

    def __init__(self, path: Path, record: dict):
        self.path, self.record = path, record
        self.digest, self.lines, self.queries = hashlib.sha256(), 0, set()

    def check(self) -> None:
        seen = {"lines": self.lines, "queries": len(self.queries), "sha256": self.digest.hexdigest()}
        wrong = [f"{k} {seen[k]} where the record says {self.record[k]}" for k in seen if seen[k] != self.record[k]]
        if wrong:
            raise _mismatch(self.path, "; ".join(wrong))


def _mismatch(path: Path, what: str) -> RunIntegrityError:
    return RunIntegrityError(
        f"{path} is not the run its record {record_path(path).name} describes ({what}): it was cut short or "
        "altered after it was written; rerun the search that writes it"
    )


def _tally(path: Path, verify: bool) -> _Tally | None:
    """The check a reading of ``path`` makes, or None for a run read unchecked (``verify=False``,
    or a run from before the records: a header line and no record). The size is checked now."""
    if not verify:
        return None
    if not record_path(path).exists() and _has_legacy_header(path):
        log.warning("%s: a run from before run records (no %s): read unchecked", path, record_path(path).name)
        return None
    record = read_record(path)
    size = path.stat().st_size
    if size != record["bytes"]:
        raise _mismatch(path, f"{size} bytes where the record says {record['bytes']}")
    return _Tally(path, record)


def _has_legacy_header(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.readline().startswith(HEADER_PREFIX.encode())


def _run_lines(path: Path, tally: _Tally | None) -> Iterator[tuple[int, str, str, float]]:
    """``(line number, query id, doc id, score)`` of each ranking line, in file order; ``#``
    comments (an old run's header) and blank lines are skipped. Errors name ``file:line``.
    With a ``tally``, every byte is hashed and the lines and queries counted."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if tally is not None:
                tally.digest.update(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text") from None
            if not line.strip() or line.startswith("#"):
                continue
            cols = line.split()
            if len(cols) != 6:
                raise ValueError(f"{path}:{lineno}: expected 6 columns 'qid Q0 docid rank score tag', got {len(cols)}")
            try:
                score = float(cols[4])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: score {cols[4]!r} is not a number") from None
            if tally is not None:
                tally.lines += 1
                tally.queries.add(cols[0])
            yield lineno, cols[0], cols[2], score


def read_run(path: str | Path, verify: bool = True) -> Run:
    """The whole run: query id -> ``[(doc id, score), ...]`` in file order (the rank column is
    not read; :func:`write_run` writes best first). A query's lines may be spread over the file.

    The run is checked against its record (size, lines, queries, sha256): a
    :class:`RunIntegrityError` naming the file when they differ or the record is missing.
    ``verify=False`` reads a run that has no record (one written by hand or another tool)."""
    path = Path(path)
    tally = _tally(path, verify)
    run: Run = {}
    for _, qid, doc, score in _run_lines(path, tally):
        run.setdefault(qid, []).append((doc, score))
    if tally is not None:
        tally.check()
    return run


def iter_run(path: str | Path, verify: bool = True) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """The run one query at a time, reading line by line: ``(query id, [(doc id, score), ...])``
    in file order, each list exactly as :func:`read_run` gives it, so only one query's ranking is
    in memory (a training run at MS MARCO scale is 100M lines).

    Each query's lines must be contiguous (as :func:`write_run` writes them); a query whose lines
    resume after another query's is an error naming ``file:line``, since its ranking would
    otherwise come out in two parts. The size is checked against the record before the first
    query, the lines, queries and sha256 after the last (the error then ends the caller's loop).
    """
    path = Path(path)
    tally = _tally(path, verify)
    started: dict[str, int] = {}  # query id -> line its block started on
    qid: str | None = None
    ranked: list[tuple[str, float]] = []
    for lineno, q, doc, score in _run_lines(path, tally):
        if q != qid:
            if q in started:
                raise ValueError(
                    f"{path}:{lineno}: query {q!r} appears again after other queries' lines (its lines "
                    f"started on line {started[q]}); a run's lines must be grouped by query, as write_run does"
                )
            if qid is not None:
                yield qid, ranked
            qid, ranked = q, []
            started[q] = lineno
        ranked.append((doc, score))
    if tally is not None:
        tally.check()
    if qid is not None:
        yield qid, ranked


def read_header(path: str | Path) -> dict:
    """The settings a run was made with: its record's, or an old run's header line; {} if neither."""
    if record_path(path).exists():
        return read_record(path)["settings"]
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    return json.loads(first[len(HEADER_PREFIX) :]) if first.startswith(HEADER_PREFIX) else {}


def setting_differences(recorded: object, expected: object, where: str = "") -> list[str]:
    """``'key: recorded -> expected'`` for each leaf where two JSON-like settings differ
    (``expected`` is compared as JSON reads it back: tuples as lists)."""
    expected = json.loads(json.dumps(expected))
    if isinstance(recorded, dict) and isinstance(expected, dict):
        out = []
        for key in sorted(set(recorded) | set(expected), key=str):
            name = f"{where}.{key}" if where else str(key)
            if key not in recorded or key not in expected:
                out.append(f"{name}: {recorded.get(key, '(absent)')!r} -> {expected.get(key, '(absent)')!r}")
            else:
                out += setting_differences(recorded[key], expected[key], name)
        return out
    return [] if recorded == expected else [f"{where or 'value'}: {recorded!r} -> {expected!r}"]


def check_run_settings(path: str | Path, expected: Mapping) -> dict:
    """The settings the run was made with (its record's; an old run's header line), after
    checking that they hold ``expected`` (key by key): a run made with other settings than the
    config's is stale, an error naming it and each difference. A run with neither: no record."""
    path = Path(path)
    old = not record_path(path).exists() and _has_legacy_header(path)
    settings = read_header(path) if old else read_record(path)["settings"]
    recorded = {k: settings.get(k, "(absent)") for k in expected}
    diffs = setting_differences(recorded, dict(expected))
    if diffs:
        raise RunIntegrityError(
            f"{path} was made with other settings than the config's (recorded -> config: {'; '.join(diffs)}): "
            f"it is stale, e.g. left by a search that failed after a settings change; rebuild it: snakemake -R {path}"
        )
    return settings


def write_qrels(path: str | Path, qrels: Mapping[str, Mapping[str, int]]) -> None:
    """Judgements as TREC qrels, ``qid 0 docid grade``, sorted by query and document id (atomic)."""
    for q, docs in qrels.items():
        for d in [q, *docs]:
            if not d or any(c.isspace() for c in d):
                raise ValueError(f"id {d!r} cannot be written to TREC qrels (empty or with whitespace)")

    def write(f) -> None:
        for q in sorted(qrels):
            f.writelines(f"{q} 0 {d} {int(qrels[q][d])}\n" for d in sorted(qrels[q]))

    atomic_files.atomic_write(path, write)


def read_qrels(path: str | Path) -> Qrels:
    """TREC qrels (``qid iteration docid grade``); errors name ``file:line``; a pair judged
    twice is an error, and so is a file with no judgement."""
    path = Path(path)
    qrels: Qrels = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) != 4:
                raise ValueError(f"{path}:{lineno}: expected 4 columns 'qid 0 docid grade', got {len(cols)}")
            qid, _, doc, grade = cols
            try:
                rel = int(grade)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: grade {grade!r} is not an integer") from None
            if doc in qrels.setdefault(qid, {}):
                raise ValueError(f"{path}:{lineno}: pair ({qid}, {doc}) judged twice")
            qrels[qid][doc] = rel
    if not qrels:
        raise ValueError(f"{path}: no judgements")
    return qrels
