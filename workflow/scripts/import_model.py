"""Snakemake entry point: import a base model into a local safetensors HF checkpoint."""

from llmret import logs, models

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
models.import_model(models.ModelSource.from_config(dict(sm.params.source)), sm.output[0])
