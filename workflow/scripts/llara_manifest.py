"""Snakemake entry point: the manifest (counts, settings, hashes) of a run's shards."""

from llmret import logs, pretrain_data

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
pretrain_data.write_manifest(list(sm.input), sm.output[0])
