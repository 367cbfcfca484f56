"""Snakemake entry point: a dataset's labelled training split (queries and positives)."""

from pathlib import Path

from llmret import atomic_files, logs, specs
from llmret.data import beir

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
spec = specs.settings(beir.TrainSplit, sm.params.train, f"datasets.{sm.wildcards.dataset}.train")
beir.prepare_train_split(sm.input[0], spec, eval_split=sm.params.eval_split, out_dir=Path(sm.output.info).parent)
