"""Snakemake entry point: build a BM25 index over a prepared corpus."""

from llmret import atomic_files, logs
from llmret.data import beir
from llmret.retrieval import bm25

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
corpus = beir.load_corpus(sm.input.corpus)
params = bm25.BM25Params.from_dict(sm.params.settings)
index = bm25.BM25Index.build(corpus.ids, corpus.contents(), params)
index.save(sm.output[0])
