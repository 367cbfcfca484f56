"""Snakemake entry point: import a base model into a local safetensors HF checkpoint; a
``file`` or ``subdir`` outside its package is refused naming ``models.{name}.file``."""

from llmret import atomic_files, logs
from llmret.retrieval import model_import

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
source = model_import.ModelSource.from_config(dict(sm.params.source), name=sm.wildcards.model)
model_import.import_model(source, sm.output[0])
