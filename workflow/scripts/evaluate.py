"""Snakemake entry point: metrics of one run (mean and per query, the count of queries
evaluated, the settings and the run's sha256) as JSON. The run is checked against its record
and the config's settings, the TREC qrels for a judgement set where something is relevant."""

from llmret import atomic_files, logs
from llmret.results import evaluation, tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
p = sm.params
result = evaluation.evaluate_files(sm.input.run, sm.input.qrels, p.metrics, p.relevance_level, p.run)
result.update(system=sm.wildcards.system, dataset=sm.wildcards.dataset)
tables.write_json(result, sm.output[0])
