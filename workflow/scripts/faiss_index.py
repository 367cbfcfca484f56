"""Snakemake entry point: FAISS inner-product index over one corpus shard's embeddings
(exact by default; IVF or HNSW per the system's index settings)."""

import numpy as np

from llmret import atomic_files, logs
from llmret.retrieval import faiss_index

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
spec = faiss_index.IndexSpec.from_config(sm.params.index)
faiss_index.write_index(faiss_index.build_index(np.load(sm.input.vectors), spec), sm.output[0])
