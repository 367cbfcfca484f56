"""Snakemake entry point: encode a prepared corpus or query set with a dense system."""

from llmret import encoding, indexing, launch, logs, tables

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
spec = encoding.EncoderSpec.from_config({k: v for k, v in sm.params.settings.items() if k != "model"})
ids, texts, kind = encoding.read_side(sm.input.texts, sm.wildcards.side)
with launch.visible_devices(sm.resources.gpu):  # outside Slurm: claim free GPUs first
    device = encoding.device_for(sm.resources.gpu)
    encoder = encoding.TextEncoder(sm.input.model, spec, device=device, threads=sm.threads)
    vectors, stats = encoding.timed_encode(lambda: encoder.encode(texts, kind), len(texts), spec, encoder.model, device)
indexing.save_embeddings(vectors, ids, sm.output.vectors, sm.output.ids)
tables.write_json(stats.to_dict(), sm.output.stats)
