"""Snakemake entry point: encode one corpus shard or a query set with a sparse system:
CSPLADE (a causal LM's SPLADE vectors) or bow (token counts of the model's tokenizer), as
its type's class does (llmret.retrieval.bow.sparse_system)."""

from transformers import AutoTokenizer

from llmret import atomic_files, logs
from llmret.results import tables
from llmret.retrieval import bow, encoder, sparse_encoder, sparse_vectors

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
system = bow.sparse_system(sm.params.kind, sm.params.settings)
ids, texts, kind = encoder.read_job_texts(sm.input, sm.wildcards)
encoder.set_threads(sm.threads)
tokenizer = AutoTokenizer.from_pretrained(sm.input.model)
vectors, stats = system.encode(sm.input.model, tokenizer, texts, kind, sm.resources.gpu)
sparse_vectors.save_sparse(sm.output.vectors, vectors, ids)
tables.write_json({**stats, **sparse_encoder.vector_stats(vectors)}, sm.output.stats)
