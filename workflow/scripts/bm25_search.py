"""Snakemake entry point: BM25 top-k for every query, written as a TREC run (six columns)
with its settings, counts and sha256 in its record beside it (<run>.json)."""

from llmret import atomic_files, logs
from llmret.data import beir, trec
from llmret.retrieval import bm25

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
index = bm25.BM25Index.load(sm.input.index)
queries = beir.load_queries(sm.input.queries)
depth = trec.search_depth(sm.params.top_k, sm.params.ignore_identical_ids)
run = index.search(queries, k=depth, n_threads=sm.threads)
if sm.params.ignore_identical_ids:
    run = trec.drop_identical_ids(run, sm.params.top_k)
header = {
    "system": sm.wildcards.system,
    "dataset": sm.wildcards.dataset,
    "type": "bm25",
    "top_k": sm.params.top_k,
    "ignore_identical_ids": sm.params.ignore_identical_ids,
    "settings": index.params.to_dict(),
}
trec.write_run(sm.output[0], run, tag=sm.wildcards.system, header=header)
