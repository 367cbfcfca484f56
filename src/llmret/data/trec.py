"""TREC run files: ``qid Q0 docid rank score tag``, with the run's settings in a header.

The header is one line starting with ``#`` holding JSON (system, dataset, settings), so a
run file says how it was made. Tools that do not skip comments (trec_eval) take
``grep -v '^#' run.trec``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

Run = dict[str, list[tuple[str, float]]]
HEADER_PREFIX = "# llmret-run "


def search_depth(top_k: int, ignore_identical_ids: bool) -> int:
    """How deep to search so that ``top_k`` results remain once a query's own id is dropped."""
    return top_k + 1 if ignore_identical_ids else top_k


def drop_identical_ids(run: Mapping[str, list[tuple[str, float]]], top_k: int) -> Run:
    """BEIR's evaluation convention (``ignore_identical_ids``; Pyserini's ``--remove-query``):
    a retrieved document whose id equals the query's is dropped, then each ranking is cut to
    ``top_k``. In ArguAna (and Quora) the queries are themselves corpus documents."""
    return {q: [(d, s) for d, s in ranked if d != q][:top_k] for q, ranked in run.items()}


def write_run(
    path: str | Path, run: Mapping[str, list[tuple[str, float]]], tag: str, header: dict | None = None
) -> None:
    """Write atomically; ties are broken by document id so files are reproducible."""
    if any(c.isspace() for c in tag) or not tag:
        raise ValueError(f"run tag must be a non-empty word, got {tag!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(HEADER_PREFIX + json.dumps(header or {}, sort_keys=True) + "\n")
        for qid in sorted(run):
            ranked = sorted(run[qid], key=lambda x: (-x[1], x[0]))
            for rank, (doc, score) in enumerate(ranked, start=1):
                f.write(f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n")
    os.replace(tmp, path)


def _run_lines(path: Path) -> Iterator[tuple[int, str, str, float]]:
    """``(line number, query id, doc id, score)`` of each ranking line, in file order; the
    header, other ``#`` comments and blank lines are skipped. Errors name ``file:line``."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip() or line.startswith("#"):
                continue
            cols = line.split()
            if len(cols) != 6:
                raise ValueError(f"{path}:{lineno}: expected 6 columns 'qid Q0 docid rank score tag', got {len(cols)}")
            try:
                score = float(cols[4])
            except ValueError:
                raise ValueError(f"{path}:{lineno}: score {cols[4]!r} is not a number") from None
            yield lineno, cols[0], cols[2], score


def read_run(path: str | Path) -> Run:
    """The whole run: query id -> ``[(doc id, score), ...]`` in file order (the rank column is
    not read; :func:`write_run` writes best first). A query's lines may be spread over the file."""
    path = Path(path)
    run: Run = {}
    for _, qid, doc, score in _run_lines(path):
        run.setdefault(qid, []).append((doc, score))
    return run


def iter_run(path: str | Path) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """The run one query at a time, reading line by line: ``(query id, [(doc id, score), ...])``
    in file order, each list exactly as :func:`read_run` gives it, so only one query's ranking is
    in memory (a training run at MS MARCO scale is 100M lines).

    Each query's lines must be contiguous (as :func:`write_run` writes them); a query whose lines
    resume after another query's is an error naming ``file:line``, since its ranking would
    otherwise come out in two parts.
    """
    path = Path(path)
    started: dict[str, int] = {}  # query id -> line its block started on
    qid: str | None = None
    ranked: list[tuple[str, float]] = []
    for lineno, q, doc, score in _run_lines(path):
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
    if qid is not None:
        yield qid, ranked


def read_header(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    return json.loads(first[len(HEADER_PREFIX) :]) if first.startswith(HEADER_PREFIX) else {}
