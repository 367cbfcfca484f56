"""Snakemake entry point: top-k sparse retrieval for every query over the corpus's shards,
one shard's index in memory at a time, written as a TREC run. The system's type weighs the
queries (bow: by the corpus's idf; llmret.retrieval.bow.sparse_system)."""

from llmret import atomic_files, logs
from llmret.data import trec
from llmret.retrieval import bow, sparse_index, sparse_vectors

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
spec = sparse_index.SparseIndexSpec.from_config(sm.params.index)
queries = sparse_vectors.load_sparse(sm.input.queries)
system = bow.sparse_system(sm.params.kind, sm.params.settings)
corpus = (sparse_vectors.load_sparse(p).matrix for p in sm.input.get("corpus", []))  # read only if weighed by it
matrix = system.weigh_queries(queries.matrix, corpus)
depth = trec.search_depth(sm.params.top_k, sm.params.ignore_identical_ids)
run, index_info = sparse_index.search_sparse_shards(sm.input.indexes, matrix, queries.ids, k=depth, spec=spec)
if sm.params.ignore_identical_ids:
    run = trec.drop_identical_ids(run, sm.params.top_k)
header = {
    "system": sm.wildcards.system,
    "dataset": sm.wildcards.dataset,
    "type": sm.params.kind,
    "top_k": sm.params.top_k,
    "ignore_identical_ids": sm.params.ignore_identical_ids,
    "index": index_info,
    "settings": dict(sm.params.settings),
    "index_settings": dict(sm.params.index),
}
trec.write_run(sm.output[0], run, tag=sm.wildcards.system, header=header)
