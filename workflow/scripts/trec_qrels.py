"""Snakemake entry point: the prepared evaluation judgements as TREC qrels (``qid 0 docid grade``),
the file the evaluation reads and trec_eval takes as is."""

from llmret import atomic_files, logs
from llmret.data import beir, trec

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
trec.write_qrels(sm.output[0], beir.load_qrels(sm.input[0]))
