"""Snakemake entry point: import a base model into a local safetensors HF checkpoint."""

from llmret import atomic_files, logs
from llmret.retrieval import model_import

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
model_import.import_model(model_import.ModelSource.from_config(dict(sm.params.source)), sm.output[0])
