"""Snakemake entry point: a released Tevatron training file, validated, as the mining output."""

from llmret import logs
from llmret.training import mining

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
mining.import_tevatron(sm.input[0], sm.output.negatives, sm.output.stats)
