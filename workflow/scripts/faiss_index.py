"""Snakemake entry point: FAISS inner-product index over corpus embeddings (exact by
default; IVF or HNSW per the system's index settings)."""

import numpy as np

from llmret import indexing, logs

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
spec = indexing.IndexSpec.from_config(sm.params.index)
indexing.write_index(indexing.build_index(np.load(sm.input.vectors), spec), sm.output[0])
