"""Snakemake entry point: a corpus's encoding figures from its shards' (throughput, size)."""

from llmret import atomic_files, logs
from llmret.results import tables
from llmret.retrieval import encoder

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
tables.write_json(encoder.merge_stats([tables.read_json(p) for p in sm.input.shards]), sm.output[0])
