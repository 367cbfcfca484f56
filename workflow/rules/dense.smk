# Dense systems: encode corpus and queries, exact FAISS inner-product index, top-k search.


rule encode:
    """One rule for every side: the corpus, the evaluation queries, or the training
    queries (train-queries) that hard-negative mining retrieves for."""
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
        side="corpus|queries|train-queries",
    conda:
        "../../envs/retrieval.yaml"
    threads: 8
    resources:
        mem_mb=6000,
        gpu=lookup(dpath="systems/{system}/gpus", within=config),
    params:
        settings=system_settings,
    script:
        "../scripts/encode.py"


rule faiss_index:
    """Exact inner product by default; IVF or HNSW (on GPU when faiss has one) per the
    system's index settings."""
    input:
        vectors="results/embeddings/{system}/{dataset}/corpus.npy",
    output:
        "results/index/{system}/{dataset}/faiss.index",
    log:
        "logs/faiss_index/{system}/{dataset}.log",
    wildcard_constraints:
        system=one_of(DENSE_SYSTEMS),
    conda:
        "../../envs/retrieval.yaml"
    params:
        index=index_settings,
    script:
        "../scripts/faiss_index.py"


rule dense_search:
    input:
        index=lambda wc: index_path(wc, "faiss.index"),
        doc_ids=lambda wc: f"results/embeddings/{wc.system}/{corpus_of(wc.dataset)}/corpus.ids",
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
    params:
        top_k=config["evaluation"]["top_k"],
        ignore_identical_ids=lookup(
            dpath="datasets/{dataset}/ignore_identical_ids", within=config
        ),
        settings=system_settings,
        index=index_settings,
    script:
        "../scripts/dense_search.py"
