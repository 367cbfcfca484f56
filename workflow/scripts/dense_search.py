"""Snakemake entry point: top-k FAISS search for every query, written as a TREC run."""

from pathlib import Path

from llmret import indexing, logs, trec

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
spec = indexing.IndexSpec.from_config(sm.params.index)
index = indexing.read_index(sm.input.index, spec)
doc_ids = Path(sm.input.doc_ids).read_text(encoding="utf-8").splitlines()
qvecs, qids = indexing.load_embeddings(sm.input.queries, sm.input.query_ids)
run = indexing.search(index, doc_ids, qvecs, qids, k=sm.params.top_k, spec=spec)
header = {
    "system": sm.wildcards.system,
    "dataset": sm.wildcards.dataset,
    "type": "dense",
    "top_k": sm.params.top_k,
    "index": indexing.describe_index(index),
    "settings": dict(sm.params.settings),
}
trec.write_run(sm.output[0], run, tag=sm.wildcards.system, header=header)
