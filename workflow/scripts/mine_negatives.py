"""Snakemake entry point: hard negatives from a retriever's run, in Tevatron's JSONL format.

The run is streamed one query at a time (its lines grouped by query, as write_run writes them).
"""

from pathlib import Path

from llmret import atomic_files, logs
from llmret.training import mining

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
mining.mine_to_file(
    run_path=sm.input.run,
    queries_path=sm.input.queries,
    qrels_path=sm.input.qrels,
    corpus_path=Path(sm.input.corpus) / "corpus.jsonl",
    spec=mining.MiningSpec.from_config(sm.params.spec),
    out_path=sm.output.negatives,
    stats_path=sm.output.stats,
)
