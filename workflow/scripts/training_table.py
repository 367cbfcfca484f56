"""Snakemake entry point: the training table (steps, time, peak memory of each training run)."""

from llmret import atomic_files, logs
from llmret.results import footprint, tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
rows = [
    footprint.training_entry(run, stage, base, path)
    for (run, stage, base), path in zip(sm.params.entries, sm.input.models, strict=True)
]
tables.write_csv(footprint.training_table(rows), sm.output[0])
