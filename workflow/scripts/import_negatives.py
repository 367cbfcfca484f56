"""Snakemake entry point: a released Tevatron training file, validated, as the mining output."""

from llmret import atomic_files, logs
from llmret.training import mining

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
mining.import_tevatron(sm.input[0], sm.output.negatives, sm.output.stats)
