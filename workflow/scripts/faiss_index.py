"""Snakemake entry point: an approximate FAISS index (IVF or HNSW, per the system's index
settings) over one corpus shard's embeddings. Exact search has no index file: it reads the
embeddings themselves."""

import numpy as np

from llmret import atomic_files, logs
from llmret.retrieval import faiss_index

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
spec = faiss_index.IndexSpec.from_config(sm.params.index)
if spec.exact:
    raise ValueError(f"{sm.output[0]}: exact search reads the stored vectors; it builds no index file")
faiss_index.write_index(faiss_index.build_index(np.load(sm.input.vectors), spec), sm.output[0])
