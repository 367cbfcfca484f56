"""Snakemake entry point: a table whose columns each name a (dataset, metric) pair."""

from llmret import atomic_files, logs
from llmret.results import tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
p = sm.params
cells = [(s, c["dataset"]) for s in p.systems for c in p.columns]  # the order of the rule's input
metrics = {
    cell: tables.read_metrics(path, p.cells[f"{cell[0]}/{cell[1]}"])
    for cell, path in zip(cells, sm.input.metrics, strict=True)
}
tables.write_csv(tables.column_table(metrics, p.systems, p.columns), sm.output.table)
