"""Snakemake entry point: bar plot of the BEIR-style table."""

import pandas as pd

from llmret import atomic_files, logs
from llmret.results import tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
table = pd.read_csv(sm.input[0]).drop(columns=["avg"])
tables.bar_plot(table, sm.output[0], metric=sm.params.metric)
