"""Snakemake entry point: loss curves of a training run."""

from llmret import atomic_files, logs
from llmret.results import plots

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
plots.plot_training_log(sm.input[0], sm.output[0], title=sm.wildcards.run)
