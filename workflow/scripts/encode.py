"""Snakemake entry point: encode a prepared corpus or query set with a dense system."""

from llmret import beir, encoding, indexing, launch, logs

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
spec = encoding.EncoderSpec.from_config({k: v for k, v in sm.params.settings.items() if k != "model"})
with launch.visible_devices(sm.resources.gpu):  # outside Slurm: claim free GPUs first
    device = encoding.device_for(sm.resources.gpu)
    encoder = encoding.TextEncoder(sm.input.model, spec, device=device, threads=sm.threads)
    if sm.wildcards.side == "corpus":
        corpus = beir.load_corpus(sm.input.texts)
        ids, vectors = corpus.ids, encoder.encode(corpus.contents(), "passage")
    else:
        queries = beir.load_queries(sm.input.texts)
        ids, vectors = list(queries), encoder.encode(list(queries.values()), "query")
    indexing.save_embeddings(vectors, ids, sm.output.vectors, sm.output.ids)
