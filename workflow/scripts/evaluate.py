"""Snakemake entry point: metrics of one run (mean and per query) as JSON."""

from llmret import atomic_files, logs
from llmret.data import beir, trec
from llmret.results import evaluation, tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
qrels = beir.load_qrels(sm.input.qrels)
result = evaluation.evaluate(qrels, trec.read_run(sm.input.run), sm.params.metrics, sm.params.relevance_level)
result.update(system=sm.wildcards.system, dataset=sm.wildcards.dataset, run=sm.input.run, qrels=sm.input.qrels)
tables.write_json(result, sm.output[0])
