"""Snakemake entry point: exact inner-product FAISS index over corpus embeddings."""

import numpy as np

from llmret import indexing, logs

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
indexing.write_index(indexing.build_flat_ip(np.load(sm.input.vectors)), sm.output[0])
