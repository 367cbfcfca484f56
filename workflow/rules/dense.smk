# Dense systems: encode corpus shards and queries, top-k search over the shards: exact search
# reads the stored vectors; ivf and hnsw build a FAISS index per shard.


rule encode_corpus:
    """One shard of a corpus (llmret.retrieval.corpus_shards): a killed encode resumes at the
    first missing shard, and no job holds more than one shard's vectors."""
    input:
        model=model_of("systems", "system"),
        texts=lambda wc: prepared(wc.dataset, "corpus"),
        info=lambda wc: prepared(wc.dataset, "info"),
    output:
        vectors="results/embeddings/{system}/{dataset}/corpus/{shard}.npy",
        ids="results/embeddings/{system}/{dataset}/corpus/{shard}.ids",
        stats="results/embeddings/{system}/{dataset}/corpus/{shard}.json",
    log:
        "logs/encode/{system}/{dataset}/corpus-{shard}.log",
    benchmark:
        "results/benchmarks/encode/{system}/{dataset}/corpus-{shard}.tsv"
    wildcard_constraints:
        system=one_of(DENSE_SYSTEMS),
        shard=SHARD_PATTERN,
    conda:
        "../../envs/retrieval.yaml"
    threads: 8
    resources:
        mem_mb=mem_mb("encode"),
        gpu=lookup(dpath="systems/{system}/gpus", within=config),
    params:
        settings=system_settings,
        tokenization=tokenization("systems", "system"),
    script:
        "../scripts/encode.py"


rule encode:
    """The evaluation queries, or the training queries (train-queries) that hard-negative
    mining retrieves for: one job each."""
    input:
        model=model_of("systems", "system"),
        texts=lambda wc: prepared(wc.dataset, wc.side),
    output:
        vectors="results/embeddings/{system}/{dataset}/{side}.npy",
        ids="results/embeddings/{system}/{dataset}/{side}.ids",
        stats="results/embeddings/{system}/{dataset}/{side}.json",
    log:
        "logs/encode/{system}/{dataset}/{side}.log",
    benchmark:
        "results/benchmarks/encode/{system}/{dataset}/{side}.tsv"
    wildcard_constraints:
        system=one_of(DENSE_SYSTEMS),
        side="queries|train-queries",
    conda:
        "../../envs/retrieval.yaml"
    threads: 8
    resources:
        mem_mb=6000,
        gpu=lookup(dpath="systems/{system}/gpus", within=config),
    params:
        settings=system_settings,
        tokenization=tokenization("systems", "system"),
    script:
        "../scripts/encode.py"


rule faiss_index:
    """An approximate index (IVF or HNSW, per the system's index settings) of one corpus
    shard, in faiss/ for the evaluation queries and, when mining builds another one,
    faiss-mining/ for the training queries. Exact search has none: it reads the vectors.
    """
    input:
        vectors="results/embeddings/{system}/{dataset}/corpus/{shard}.npy",
    output:
        "results/index/{system}/{dataset}/{folder}/{shard}.index",
    log:
        "logs/faiss_index/{system}/{dataset}/{folder}-{shard}.log",
    wildcard_constraints:
        system=one_of(DENSE_SYSTEMS),
        folder="faiss|faiss-mining",
        shard=SHARD_PATTERN,
    conda:
        "../../envs/retrieval.yaml"
    resources:
        mem_mb=mem_mb("index"),
    params:
        index=index_build,
    script:
        "../scripts/faiss_index.py"


rule dense_search:
    """Every shard in turn (its stored vectors, or its FAISS index for ivf/hnsw), merged into
    the top-k."""
    input:
        shards=search_shards(mining=False),
        doc_ids=shard_files("embeddings", "corpus", ".ids"),
        queries="results/embeddings/{system}/{dataset}/queries.npy",
        query_ids="results/embeddings/{system}/{dataset}/queries.ids",
    output:
        "results/runs/{system}/{dataset}.trec",
    log:
        "logs/dense_search/{system}/{dataset}.log",
    benchmark:
        "results/benchmarks/dense_search/{system}/{dataset}.tsv"
    wildcard_constraints:
        system=one_of(DENSE_SYSTEMS),
    conda:
        "../../envs/retrieval.yaml"
    threads: 2
    resources:
        mem_mb=mem_mb("search", train=False),
    params:
        top_k=config["evaluation"]["top_k"],
        ignore_identical_ids=lookup(
            dpath="datasets/{dataset}/ignore_identical_ids", within=config
        ),
        settings=system_settings,
        index=index_settings,
    script:
        "../scripts/dense_search.py"
