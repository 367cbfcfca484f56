"""Snakemake entry point: the manifest (counts, settings, hashes) of a run's shards."""

from llmret import logs
from llmret.llara import shards

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
shards.write_manifest(list(sm.input), sm.output[0])
