"""Snakemake entry point: top-k FAISS search for every query, written as a TREC run."""

from pathlib import Path

from llmret import io, logs
from llmret.data import trec
from llmret.retrieval import faiss_index

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
io.remove_stale_temporaries(sm.output)
spec = faiss_index.IndexSpec.from_config(sm.params.index)
index = faiss_index.read_index(sm.input.index, spec)
doc_ids = Path(sm.input.doc_ids).read_text(encoding="utf-8").splitlines()
qvecs, qids = faiss_index.load_embeddings(sm.input.queries, sm.input.query_ids)
depth = trec.search_depth(sm.params.top_k, sm.params.ignore_identical_ids)
run = faiss_index.search(index, doc_ids, qvecs, qids, k=depth, spec=spec)
if sm.params.ignore_identical_ids:
    run = trec.drop_identical_ids(run, sm.params.top_k)
header = {
    "system": sm.wildcards.system,
    "dataset": sm.wildcards.dataset,
    "type": "dense",
    "top_k": sm.params.top_k,
    "ignore_identical_ids": sm.params.ignore_identical_ids,
    "index": faiss_index.describe_index(index),
    "settings": dict(sm.params.settings),
}
trec.write_run(sm.output[0], run, tag=sm.wildcards.system, header=header)
