"""Snakemake entry point: import a base model into a local safetensors HF checkpoint."""

from llmret import io, logs
from llmret.retrieval import checkpoints

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
io.remove_stale_temporaries(sm.output)
checkpoints.import_model(checkpoints.ModelSource.from_config(dict(sm.params.source)), sm.output[0])
