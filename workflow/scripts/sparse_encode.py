"""Snakemake entry point: encode one corpus shard or a query set with a sparse (CSPLADE) system."""

from transformers import AutoTokenizer

from llmret import io, launch, logs
from llmret.results import tables
from llmret.retrieval import encoder, sparse_encoder, sparse_vectors

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
io.remove_stale_temporaries(sm.output)
spec = sparse_encoder.SparseEncoderSpec.from_config({k: v for k, v in sm.params.settings.items() if k != "model"})
if "shard" in sm.wildcards.keys():
    ids, texts, kind = encoder.read_shard(sm.input.texts, sm.input.info, sm.wildcards.shard)
else:
    ids, texts, kind = encoder.read_side(sm.input.texts, sm.wildcards.side)
encoder.set_threads(sm.threads)
tokenizer = AutoTokenizer.from_pretrained(sm.input.model)
with launch.visible_devices(sm.resources.gpu):  # outside Slurm: claim free GPUs first
    device = encoder.device_for(sm.resources.gpu)
    model = sparse_encoder.load_sparse_encoder(sm.input.model, spec, device)
    encode = lambda: sparse_encoder.encode_sparse(model, tokenizer, texts, kind, spec)  # noqa: E731
    vectors, stats = encoder.timed_encode(encode, len(texts), spec, model, device)
sparse_vectors.save_sparse(sm.output.vectors, vectors, ids)
tables.write_json({**stats.to_dict(), **sparse_encoder.vector_stats(vectors)}, sm.output.stats)
