"""Snakemake entry point: tokenize one shard of LLaRA pretraining pairs."""

from llmret import atomic_files, logs
from llmret.llara import pretraining

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
spec = pretraining.PretrainSpec.from_config(sm.params.spec)
pretraining.make_shard(
    list(sm.input.corpora), sm.input.model, int(sm.wildcards.shard), spec, sm.output[0], dpr_paths=list(sm.input.dpr)
)
