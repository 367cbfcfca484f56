"""Hard negatives mined from a retriever's run, written as a Tevatron training file.

Negatives come from a rank window of the run (the very top is skipped: it holds many
unlabelled relevant passages). Two optional score filters drop candidates that score
too close to the query's best positive, since those are likely false negatives: a fixed
``margin`` below it, or a ``max_score_ratio`` of it (NV-Retriever's "TopK-PercPos"; meant
for positive scores such as cosine similarities: below zero a share of the score is above it).
When the window holds more eligible candidates than ``max_negatives``, ``selection`` says
which: ``spread`` (evenly across the window) or ``best`` (the best-ranked ones).

The run is read one query at a time (:func:`llmret.data.trec.iter_run`), so mining holds one
query's ranking, the qrels and the chosen negative ids, never the whole run.

Tevatron's format is one JSON object per line: ``query_id``, ``query``,
``positive_passages`` and ``negative_passages``, each passage ``{docid, title, text}``.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from llmret import schema
from llmret.atomic_files import atomic_write
from llmret.data import beir, trec
from llmret.specs import settings

log = logging.getLogger(__name__)

TEVATRON_KEYS = ("query_id", "query", "positive_passages", "negative_passages")


@dataclass(frozen=True)
@schema.defaults_from("mining")
class MiningSpec:
    """Which candidates of a run become negatives (the ``mining`` config section)."""

    depth: int  # retrieval depth of the run over training queries
    rank_from: int  # 1-based, inclusive
    rank_to: int  # inclusive, <= depth
    max_negatives: int  # per query
    margin: float | None  # drop score > best_positive - margin
    max_score_ratio: float | None  # drop score > ratio * best_positive
    min_negatives: int  # queries left with fewer are dropped
    # more eligible than max_negatives: "spread" over the window, or "best"-ranked
    selection: str

    def __post_init__(self) -> None:
        # a negative margin would let through candidates scoring above the positive (the schema says >= 0)
        schema.check_bounds(self, "mining", "mining ")
        if self.rank_to < self.rank_from:
            raise ValueError(f"mining rank_to must be an integer >= {self.rank_from}, got {self.rank_to!r}")
        if self.rank_to > self.depth:
            raise ValueError(f"mining rank_to ({self.rank_to}) must be <= depth ({self.depth}): the run ends there")
        if self.min_negatives > self.max_negatives:
            raise ValueError(
                f"mining min_negatives ({self.min_negatives}) must be <= max_negatives ({self.max_negatives}), "
                "or every query would be dropped"
            )

    @classmethod
    def from_config(cls, cfg: Mapping) -> MiningSpec:
        return settings(cls, cfg, "mining settings")


@dataclass
class _Selection:
    negatives: list[str]
    by_margin: int = 0
    by_ratio: int = 0
    positive_retrieved: bool = False


def _select(ranked: list[tuple[str, float]], positives: set[str], spec: MiningSpec) -> _Selection:
    scores = [s for d, s in ranked if d in positives]
    best = max(scores) if scores else None
    out = _Selection(negatives=[], positive_retrieved=best is not None)
    # "best" stops once the list is full; "spread" needs every eligible candidate of the window.
    limit = spec.max_negatives if spec.selection == "best" else None
    seen: set[str] = set()
    for rank, (doc, score) in enumerate(ranked, start=1):
        if rank > spec.rank_to or (limit is not None and len(out.negatives) >= limit):
            break
        if rank < spec.rank_from or doc in positives or doc in seen:
            continue
        seen.add(doc)
        if best is not None:
            if spec.margin is not None and score > best - spec.margin:
                out.by_margin += 1
                continue
            if spec.max_score_ratio is not None and score > spec.max_score_ratio * best:
                out.by_ratio += 1
                continue
        out.negatives.append(doc)
    if limit is None:
        out.negatives = spread(out.negatives, spec.max_negatives)
    return out


def spread(eligible: list[str], k: int) -> list[str]:
    """``k`` items of ``eligible`` (in rank order) at evenly spaced positions, all of them when
    there are at most ``k``: cut the ``n`` items into ``k`` consecutive, equally long stretches
    and take the first of each, i.e. the items at positions ``(j * n) // k`` for
    ``j = 0 .. k-1`` (0-based). The first item (the best-ranked) is always taken; positions
    are strictly increasing, so the result keeps rank order and has no repeats; the last one
    taken is within ``n / k`` places of the end."""
    n = len(eligible)
    if n <= k:
        return list(eligible)
    return [eligible[(j * n) // k] for j in range(k)]


def select_negatives(ranked: list[tuple[str, float]], positives: set[str], spec: MiningSpec) -> list[str]:
    """Negatives for one query: ids at ranks ``rank_from..rank_to`` of ``ranked`` (1-based
    list positions), in rank order, at most ``max_negatives``.

    Labelled positives are never returned, whatever their rank. The score filters compare
    with the best score of any positive found anywhere in ``ranked``; when no positive was
    retrieved there is nothing to compare with, so the filters drop nothing. A document
    listed twice inside the window is judged at its first rank there only.

    Which ones when more are eligible (not a positive, not a repeat, not filtered) than
    ``max_negatives``: with ``selection="spread"`` the eligible candidates of the whole window
    are thinned evenly (:func:`spread`: the best-ranked one, then one every ``n / k`` eligible
    candidates), so a window "ranks 10-200" really reaches down to rank ~200; with ``"best"``
    the first ``max_negatives`` eligible ones from ``rank_from`` on are taken.
    """
    return _select(ranked, positives, spec).negatives


def mine(
    run: Mapping[str, list[tuple[str, float]]] | Iterable[tuple[str, list[tuple[str, float]]]],
    qrels: Mapping[str, Mapping[str, int]],
    spec: MiningSpec,
) -> tuple[dict[str, list[str]], dict]:
    """Negatives for every judged query that has a positive (grade > 0), and stats.

    ``run`` is a mapping query id -> ranking (:func:`llmret.data.trec.read_run`) or a stream of
    ``(query id, ranking)`` pairs (:func:`llmret.data.trec.iter_run`), each query once; a stream
    is consumed one query at a time, so only the chosen ids are kept. The result is the same
    either way, keyed in query id order.

    ``queries_in`` counts the judged queries with a positive; each is kept, or dropped for having
    no ranking in the run or fewer than ``min_negatives`` negatives. ``positives_retrieved_fraction``
    is the share of queries with a ranking whose ranking holds a positive (only there can the
    score filters apply); ``filtered_by_*`` count candidates each filter removed (margin is tried
    first): with ``selection="best"`` those met while a query's list was filling, with
    ``"spread"`` those of the whole window (every candidate there is examined before thinning).
    """
    pairs = run.items() if isinstance(run, Mapping) else run
    judged_with_positive = sum(1 for judged in qrels.values() if any(grade > 0 for grade in judged.values()))
    chosen: dict[str, list[str]] = {}
    ranked_queries: set[str] = set()
    stats = dict.fromkeys(
        ("queries_in", "queries_kept", "dropped_no_run", "dropped_too_few_negatives", "negatives_total"), 0
    )
    by_margin = by_ratio = with_positive = 0
    for qid, ranked in pairs:
        positives = {d for d, grade in qrels.get(qid, {}).items() if grade > 0}
        if not positives or not ranked:
            continue
        if qid in ranked_queries:
            raise ValueError(f"query {qid!r} has two rankings in the run")
        ranked_queries.add(qid)
        sel = _select(ranked, positives, spec)
        by_margin += sel.by_margin
        by_ratio += sel.by_ratio
        with_positive += sel.positive_retrieved
        if len(sel.negatives) < spec.min_negatives:
            stats["dropped_too_few_negatives"] += 1
            continue
        chosen[qid] = sel.negatives
        stats["negatives_total"] += len(sel.negatives)
    with_run = len(ranked_queries)
    stats["queries_in"] = judged_with_positive
    stats["dropped_no_run"] = judged_with_positive - with_run
    negatives = {qid: chosen[qid] for qid in sorted(chosen)}
    stats["queries_kept"] = len(negatives)
    return negatives, {
        **stats,
        "mean_negatives": stats["negatives_total"] / len(negatives) if negatives else 0.0,
        "positives_retrieved_fraction": with_positive / with_run if with_run else 0.0,
        "filtered_by_margin": by_margin,
        "filtered_by_ratio": by_ratio,
    }


def _positives(judged: Mapping[str, int]) -> list[str]:
    """Positive ids, highest grade first, then by id, so the file is reproducible."""
    return [d for d, g in sorted(judged.items(), key=lambda x: (-x[1], x[0])) if g > 0]


def _passages(ids: list[str], corpus_path: str | Path) -> dict[str, dict[str, str]]:
    """Title and text of ``ids``, from one pass over the corpus keeping only those (its ids
    were checked for repeats when the dataset was prepared, so they are not remembered here)."""
    wanted = set(ids)
    found: dict[str, dict[str, str]] = {}
    for doc_id, title, text in beir.iter_corpus(corpus_path, check_ids=False):
        if doc_id in wanted:
            found[doc_id] = {"docid": doc_id, "title": title, "text": text}
    missing = sorted(wanted - found.keys())
    if missing:
        raise ValueError(
            f"{corpus_path}: {len(missing)} document ids needed for training are not in the corpus (e.g. {missing[:5]})"
        )
    return found


def write_tevatron(
    path: str | Path,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    negatives: Mapping[str, list[str]],
    corpus_path: str | Path,
) -> None:
    """Write one Tevatron example per query of ``negatives``, sorted by query id, atomically."""
    no_text = sorted(q for q in negatives if q not in queries)
    if no_text:
        raise ValueError(f"{len(no_text)} queries with negatives have no text (e.g. {no_text[:5]})")
    no_positive = sorted(q for q in negatives if not _positives(qrels.get(q, {})))
    if no_positive:
        raise ValueError(
            f"{len(no_positive)} queries with negatives have no positive judgment (e.g. {no_positive[:5]})"
        )
    positives = {q: _positives(qrels[q]) for q in negatives}
    passages = _passages([d for q in negatives for d in positives[q] + negatives[q]], corpus_path)

    def write(f: IO[str]) -> None:
        for qid in sorted(negatives):
            example = {
                "query_id": qid,
                "query": queries[qid],
                "positive_passages": [passages[d] for d in positives[qid]],
                "negative_passages": [passages[d] for d in negatives[qid]],
            }
            f.write(json.dumps(example, ensure_ascii=False) + "\n")

    atomic_write(Path(path), write)


def write_random_groups(ds: beir.Dataset, path: str | Path, negatives: int, seed: int = 0) -> None:
    """A Tevatron file without a retriever: each judged query of ``ds`` (qrels order) with its
    positives and ``negatives`` passages drawn at random from the rest of the corpus (seeded;
    passage text without title). For probes about the start of training, where the negatives'
    quality does not matter; the workflow mines with :func:`mine_to_file`."""
    rng = random.Random(seed)
    text = dict(zip(ds.corpus.ids, ds.corpus.texts, strict=True))

    def write(f: IO[str]) -> None:
        for qid, rels in ds.qrels.items():
            pos = [d for d, g in rels.items() if g > 0]
            negs = [d for d in rng.sample(ds.corpus.ids, negatives + len(pos)) if d not in rels][:negatives]
            example = {
                "query_id": qid,
                "query": ds.queries[qid],
                "positive_passages": [{"docid": d, "title": "", "text": text[d]} for d in pos],
                "negative_passages": [{"docid": d, "title": "", "text": text[d]} for d in negs],
            }
            f.write(json.dumps(example) + "\n")

    atomic_write(Path(path), write)


def _check_passage(p: object, where: str) -> None:
    if not isinstance(p, dict):
        raise ValueError(f"{where}: a passage must be a JSON object, got {type(p).__name__}")
    if not isinstance(p.get("docid"), str) or not p["docid"]:
        raise ValueError(f"{where}: a passage has no 'docid' string")
    if not isinstance(p.get("text"), str):
        raise ValueError(f"{where}: passage {p['docid']!r} has no 'text' string")
    if not isinstance(p.get("title", ""), str):
        raise ValueError(f"{where}: passage {p['docid']!r} has a 'title' that is not a string")


def check_tevatron_record(ex: dict, where: str) -> None:
    """One Tevatron example's keys and types (all of :func:`read_tevatron`'s checks but repeats)."""
    for key in TEVATRON_KEYS:
        if key not in ex:
            raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(ex["query_id"], str) or not ex["query_id"]:
        raise ValueError(f"{where}: 'query_id' must be a non-empty string, got {ex['query_id']!r}")
    if not isinstance(ex["query"], str):
        raise ValueError(f"{where}: 'query' must be a string")
    for key in ("positive_passages", "negative_passages"):
        if not isinstance(ex[key], list):
            raise ValueError(f"{where}: {key!r} must be a list")
        for p in ex[key]:
            _check_passage(p, where)
    if not ex["positive_passages"]:
        raise ValueError(f"{where}: 'positive_passages' is empty")


def read_tevatron(path: str | Path) -> list[dict]:
    """Read and validate a Tevatron training file; errors name ``file:line``, since a bad
    example would otherwise surface deep inside a training run."""
    path = Path(path)
    examples: list[dict] = []
    first_line: dict[str, int] = {}
    for lineno, ex in beir.jsonl_records(path):
        where = f"{path}:{lineno}"
        check_tevatron_record(ex, where)
        if ex["query_id"] in first_line:
            raise ValueError(
                f"{where}: duplicate query id {ex['query_id']!r} (first on line {first_line[ex['query_id']]})"
            )
        first_line[ex["query_id"]] = lineno
        examples.append(ex)
    return examples


def import_tevatron(src_path: str | Path, out_path: str | Path, stats_path: str | Path) -> dict:
    """Take negatives mined elsewhere (a released Tevatron training file, plain or gzip):
    validated line by line, written as the stage's JSONL sorted by query id, with stats in
    the same form :func:`mine_to_file` writes, so fine-tuning cannot tell the two apart."""
    examples = sorted(read_tevatron(src_path), key=lambda ex: ex["query_id"])
    counts = [len(ex["negative_passages"]) for ex in examples]
    stats = {
        "source": str(src_path),
        "queries_kept": len(examples),
        "negatives_total": sum(counts),
        "mean_negatives": sum(counts) / len(counts) if counts else 0.0,
        "queries_without_negatives": sum(1 for c in counts if c == 0),
    }
    atomic_write(Path(out_path), lambda f: f.writelines(json.dumps(ex, ensure_ascii=False) + "\n" for ex in examples))
    atomic_write(Path(stats_path), lambda f: f.write(json.dumps(stats, indent=2, sort_keys=True) + "\n"))
    log.info("imported %s: %s", src_path, stats)
    return stats


def mine_to_file(
    run_path: str | Path,
    queries_path: str | Path,
    qrels_path: str | Path,
    corpus_path: str | Path,
    spec: MiningSpec,
    out_path: str | Path,
    stats_path: str | Path,
) -> dict:
    """Mine negatives from a run over training queries, read one query at a time (its lines
    must be grouped by query, as :func:`llmret.data.trec.write_run` writes them); write the
    Tevatron file and a stats JSON (the stats, the settings and the run's header). Returns what
    the stats file holds."""
    queries = beir.load_queries(queries_path)
    qrels = beir.load_qrels(qrels_path)
    deepest = 0

    def rankings() -> Iterator[tuple[str, list[tuple[str, float]]]]:
        nonlocal deepest
        for qid, ranked in trec.iter_run(run_path):  # one query at a time
            deepest = max(deepest, len(ranked))
            yield qid, ranked

    negatives, stats = mine(rankings(), qrels, spec)
    if deepest < spec.rank_to:
        log.warning(
            "%s ranks at most %d documents per query; the window ends at rank %d", run_path, deepest, spec.rank_to
        )
    if not negatives:
        raise ValueError(f"{run_path}: no query kept for training ({json.dumps(stats)})")
    no_text = sorted(q for q in negatives if q not in queries)
    if no_text:
        raise ValueError(f"{queries_path}: {len(no_text)} judged queries have no text (e.g. {no_text[:5]})")
    write_tevatron(out_path, queries, qrels, negatives, corpus_path)
    record = {**stats, "settings": asdict(spec), "run_header": trec.read_header(run_path)}
    atomic_write(Path(stats_path), lambda f: f.write(json.dumps(record, indent=2, sort_keys=True) + "\n"))
    log.info("mined negatives: %s", json.dumps(stats, sort_keys=True))
    return record
