"""Snakemake entry point: encode one corpus shard or a query set with a dense system."""

from llmret import atomic_files, launch, logs
from llmret.results import tables
from llmret.retrieval import encoder, faiss_index

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
spec = encoder.EncoderSpec.from_config({k: v for k, v in sm.params.settings.items() if k != "model"})
ids, texts, kind = encoder.read_job_texts(sm.input, sm.wildcards)
with launch.visible_devices(sm.resources.gpu):  # outside Slurm: claim free GPUs first
    device = encoder.device_for(sm.resources.gpu)
    text_encoder = encoder.TextEncoder(sm.input.model, spec, device=device, threads=sm.threads)
    vectors, stats = encoder.timed_encode(
        lambda: text_encoder.encode(texts, kind), len(texts), spec, text_encoder.model, device
    )
dtype = faiss_index.storage_dtype(spec.dtype)
faiss_index.save_embeddings(vectors, ids, sm.output.vectors, sm.output.ids, dtype=dtype)
tables.write_json(stats.to_dict(), sm.output.stats)
