"""Snakemake entry point: top-k FAISS search for every query over the corpus's shards, one
shard's index in memory at a time, written as a TREC run."""

from llmret import atomic_files, logs
from llmret.data import trec
from llmret.retrieval import faiss_index

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
spec = faiss_index.IndexSpec.from_config(sm.params.index)
qvecs, qids = faiss_index.load_embeddings(sm.input.queries, sm.input.query_ids)
depth = trec.search_depth(sm.params.top_k, sm.params.ignore_identical_ids)
top, index_info = faiss_index.search_shards(sm.input.indexes, sm.input.doc_ids, qvecs, qids, k=depth, spec=spec)
run = top.run(qids, drop_identical_ids=sm.params.ignore_identical_ids, top_k=sm.params.top_k)
header = {
    "system": sm.wildcards.system,
    "dataset": sm.wildcards.dataset,
    "type": "dense",
    "top_k": sm.params.top_k,
    "ignore_identical_ids": sm.params.ignore_identical_ids,
    "index": index_info,
    "settings": dict(sm.params.settings),
}
trec.write_run(sm.output[0], run, tag=sm.wildcards.system, header=header)
