"""Snakemake entry point: top-k sparse retrieval for every query over the corpus's shards,
one shard's index in memory at a time, written as a TREC run."""

from llmret import io, logs
from llmret.data import trec
from llmret.retrieval import sparse_index, sparse_vectors

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
io.remove_stale_temporaries(sm.output)
spec = sparse_index.SparseIndexSpec.from_config(sm.params.index)
queries = sparse_vectors.load_sparse(sm.input.queries)
depth = trec.search_depth(sm.params.top_k, sm.params.ignore_identical_ids)
run, index_info = sparse_index.search_sparse_shards(sm.input.indexes, queries.matrix, queries.ids, k=depth, spec=spec)
if sm.params.ignore_identical_ids:
    run = trec.drop_identical_ids(run, sm.params.top_k)
header = {
    "system": sm.wildcards.system,
    "dataset": sm.wildcards.dataset,
    "type": "sparse",
    "top_k": sm.params.top_k,
    "ignore_identical_ids": sm.params.ignore_identical_ids,
    "index": index_info,
    "settings": dict(sm.params.settings),
}
trec.write_run(sm.output[0], run, tag=sm.wildcards.system, header=header)
