"""Snakemake entry point: the index-size table (sparse inverted indexes next to FAISS indexes)."""

from llmret import atomic_files, logs
from llmret.results import footprint, tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
paths = iter(sm.input.indexes)  # each entry's shards, in entry order
rows = [
    footprint.index_entry(system, kind, dataset, [next(paths) for _ in range(shards)])
    for system, kind, dataset, shards in sm.params.entries
]
tables.write_csv(footprint.index_sizes_table(rows), sm.output[0])
