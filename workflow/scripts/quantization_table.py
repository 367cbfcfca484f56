"""Snakemake entry point: the quantization table and its plot."""

from llmret import atomic_files, logs
from llmret.results import footprint, tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
p = sm.params
indexes = iter(sm.input.indexes)  # each system's shards, in system order
rows = [
    footprint.quantization_entry(
        system,
        tables.read_json(stats),
        [next(indexes) for _ in range(p.shards)],
        tables.read_metrics(metrics, p.cells[f"{system}/{p.dataset}"]),
        p.dataset,
        p.metric,
    )
    for system, stats, metrics in zip(p.systems, sm.input.stats, sm.input.metrics, strict=True)
]
table = footprint.quantization_table(rows, p.metric)
tables.write_csv(table, sm.output.table)
footprint.tradeoff_plot(table, sm.output.plot, p.metric)
