"""Snakemake entry point: an inverted index (exact scorer or Seismic) over a corpus's sparse vectors."""

from llmret import atomic_files, logs
from llmret.retrieval import sparse_index, sparse_vectors

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
spec = sparse_index.SparseIndexSpec.from_config(sm.params.index)
docs = sparse_vectors.load_sparse(sm.input.vectors)
index = sparse_index.build_sparse_index(docs.matrix, docs.ids, spec)
sparse_index.write_sparse_index(index, sm.output[0])
