"""Snakemake entry point: top-k dense search for every query over the corpus's shards, one
shard in memory at a time (exact: the stored vectors, on the job's GPU when it has one;
ivf/hnsw: each shard's FAISS index), written as a TREC run."""

from llmret import atomic_files, launch, logs
from llmret.data import trec
from llmret.retrieval import dense_search, faiss_index

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
spec = faiss_index.IndexSpec.from_config(sm.params.index)
qvecs, qids = faiss_index.load_embeddings(sm.input.queries, sm.input.query_ids)
depth = trec.search_depth(sm.params.top_k, sm.params.ignore_identical_ids)
gpus = getattr(sm.resources, "gpu", 0)
dense_search.set_threads(sm.threads)
with launch.visible_devices(gpus):  # outside Slurm: claim a free GPU first
    device = dense_search.search_device(gpus, spec)
    shards, doc_ids = sm.input.shards, sm.input.doc_ids
    top, index_info = dense_search.search(shards, doc_ids, qvecs, qids, k=depth, spec=spec, device=device)
run = top.run(qids, drop_identical_ids=sm.params.ignore_identical_ids, top_k=sm.params.top_k)
header = {
    "system": sm.wildcards.system,
    "dataset": sm.wildcards.dataset,
    "type": "dense",
    "top_k": sm.params.top_k,
    "ignore_identical_ids": sm.params.ignore_identical_ids,
    "index": index_info,
    "settings": dict(sm.params.settings),
    "index_settings": dict(sm.params.index),
}
trec.write_run(sm.output[0], run, tag=sm.wildcards.system, header=header)
