# BM25 with Pyserini's "flat" settings (Lucene analyzer, k1=0.9, b=0.4) on bm25s.


rule bm25_index:
    input:
        corpus=lambda wc: prepared(wc.dataset, "corpus"),
    output:
        directory("results/index/{system}/{dataset}/bm25"),
    log:
        "logs/bm25_index/{system}/{dataset}.log",
    benchmark:
        "results/benchmarks/bm25_index/{system}/{dataset}.tsv"
    wildcard_constraints:
        system=one_of(BM25_SYSTEMS),
    conda:
        "../../envs/retrieval.yaml"
    params:
        settings=system_settings,
    script:
        "../scripts/bm25_index.py"


rule bm25_search:
    input:
        index=lambda wc: index_path(wc, "bm25"),
        queries=lambda wc: prepared(wc.dataset, "queries"),
    output:
        "results/runs/{system}/{dataset}.trec",
    log:
        "logs/bm25_search/{system}/{dataset}.log",
    benchmark:
        "results/benchmarks/bm25_search/{system}/{dataset}.tsv"
    wildcard_constraints:
        system=one_of(BM25_SYSTEMS),
    conda:
        "../../envs/retrieval.yaml"
    threads: 2
    params:
        top_k=config["evaluation"]["top_k"],
        ignore_identical_ids=lookup(
            dpath="datasets/{dataset}/ignore_identical_ids", within=config
        ),
    script:
        "../scripts/bm25_search.py"
