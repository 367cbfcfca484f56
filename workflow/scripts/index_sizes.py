"""Snakemake entry point: the index-size table (sparse inverted indexes next to FAISS indexes)."""

from llmret import io, logs
from llmret.results import footprint, tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
io.remove_stale_temporaries(sm.output)
rows = [
    footprint.index_entry(system, kind, dataset, path)
    for (system, kind, dataset), path in zip(sm.params.entries, sm.input.indexes, strict=True)
]
tables.write_csv(footprint.index_sizes_table(rows), sm.output[0])
