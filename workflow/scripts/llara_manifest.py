"""Snakemake entry point: the manifest (counts, settings, hashes) of a run's shards."""

from llmret import atomic_files, logs
from llmret.llara import shard_dataset

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
shard_dataset.write_manifest(list(sm.input), sm.output[0])
