"""Snakemake entry point: encode one corpus shard or a query set with a sparse system:
CSPLADE (a causal LM's SPLADE vectors) or bow (token counts of the model's tokenizer)."""

from transformers import AutoTokenizer

from llmret import atomic_files, launch, logs
from llmret.results import tables
from llmret.retrieval import bow, encoder, sparse_encoder, sparse_vectors

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
settings = {k: v for k, v in sm.params.settings.items() if k != "model"}
ids, texts, kind = encoder.read_job_texts(sm.input, sm.wildcards)
encoder.set_threads(sm.threads)
tokenizer = AutoTokenizer.from_pretrained(sm.input.model)
if sm.params.kind == "bow":
    spec = bow.BowSpec.from_config(settings)
    vectors, stats = bow.timed_encode_bow(tokenizer, texts, kind, spec)
else:
    spec = sparse_encoder.SparseEncoderSpec.from_config(settings)
    with launch.visible_devices(sm.resources.gpu):  # outside Slurm: claim free GPUs first
        device = encoder.device_for(sm.resources.gpu)
        model = sparse_encoder.load_sparse_encoder(sm.input.model, spec, device)
        encode = lambda: sparse_encoder.encode_sparse(model, tokenizer, texts, kind, spec)  # noqa: E731
        vectors, stats = encoder.timed_encode(encode, len(texts), spec, model, device)
    stats = stats.to_dict()
sparse_vectors.save_sparse(sm.output.vectors, vectors, ids)
tables.write_json({**stats, **sparse_encoder.vector_stats(vectors)}, sm.output.stats)
