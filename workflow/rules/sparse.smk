# Sparse systems: CSPLADE (SPLADE vectors of corpus and queries from a causal LM) and the
# bag-of-words reference (bow: a model's tokenizer, no model);
# an inverted index per corpus shard (exact scorer or Seismic), top-k search over the shards.


rule sparse_encode_corpus:
    """One corpus shard as sparse vectors (safetensors CSR + ids) and its encoding figures."""
    input:
        model=model_of("systems", "system"),
        texts=lambda wc: prepared(wc.dataset, "corpus"),
        info=lambda wc: prepared(wc.dataset, "info"),
    output:
        vectors="results/sparse/{system}/{dataset}/corpus/{shard}.safetensors",
        stats="results/sparse/{system}/{dataset}/corpus/{shard}.json",
    log:
        "logs/sparse_encode/{system}/{dataset}/corpus-{shard}.log",
    benchmark:
        "results/benchmarks/sparse_encode/{system}/{dataset}/corpus-{shard}.tsv"
    wildcard_constraints:
        system=one_of(SPARSE_SYSTEMS),
        shard=SHARD_PATTERN,
    conda:
        "../../envs/retrieval.yaml"
    threads: 8
    resources:
        mem_mb=mem_mb("encode"),
        gpu=lookup(dpath="systems/{system}/gpus", within=config),
    params:
        kind=lookup(dpath="systems/{system}/type", within=config),
        settings=system_settings,
        tokenization=tokenization("systems", "system"),
    script:
        "../scripts/sparse_encode.py"


rule sparse_encode:
    """Evaluation queries or training queries as sparse vectors (safetensors CSR + ids)
    and the encoding's figures (throughput, weight size at its precision)."""
    input:
        model=model_of("systems", "system"),
        texts=lambda wc: prepared(wc.dataset, wc.side),
    output:
        vectors="results/sparse/{system}/{dataset}/{side}.safetensors",
        stats="results/sparse/{system}/{dataset}/{side}.json",
    log:
        "logs/sparse_encode/{system}/{dataset}/{side}.log",
    benchmark:
        "results/benchmarks/sparse_encode/{system}/{dataset}/{side}.tsv"
    wildcard_constraints:
        system=one_of(SPARSE_SYSTEMS),
        side="queries|train-queries",
    conda:
        "../../envs/retrieval.yaml"
    threads: 8
    resources:
        mem_mb=8000,
        gpu=lookup(dpath="systems/{system}/gpus", within=config),
    params:
        kind=lookup(dpath="systems/{system}/type", within=config),
        settings=system_settings,
        tokenization=tokenization("systems", "system"),
    script:
        "../scripts/sparse_encode.py"


rule sparse_index:
    """One inverted index per corpus shard."""
    input:
        vectors="results/sparse/{system}/{dataset}/corpus/{shard}.safetensors",
    output:
        directory("results/index/{system}/{dataset}/sparse/{shard}"),
    log:
        "logs/sparse_index/{system}/{dataset}/{shard}.log",
    benchmark:
        "results/benchmarks/sparse_index/{system}/{dataset}/{shard}.tsv"
    wildcard_constraints:
        system=one_of(SPARSE_SYSTEMS),
        shard=SHARD_PATTERN,
    conda:
        "../../envs/retrieval.yaml"
    threads: 2
    params:
        index=sparse_index_settings,
    script:
        "../scripts/sparse_index.py"


rule sparse_search:
    """Every shard's index in turn, merged into the exact top-k."""
    input:
        indexes=shard_files("index", "sparse", ""),
        corpus=bow_corpus,
        queries="results/sparse/{system}/{dataset}/queries.safetensors",
    output:
        "results/runs/{system}/{dataset}.trec",
    log:
        "logs/sparse_search/{system}/{dataset}.log",
    benchmark:
        "results/benchmarks/sparse_search/{system}/{dataset}.tsv"
    wildcard_constraints:
        system=one_of(SPARSE_SYSTEMS),
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
        kind=lookup(dpath="systems/{system}/type", within=config),
        settings=system_settings,
        index=sparse_index_settings,
    script:
        "../scripts/sparse_search.py"


use rule sparse_search as sparse_search_train with:
    input:
        indexes=shard_files("index", "sparse", ""),
        corpus=bow_corpus,
        queries="results/sparse/{system}/{dataset}/train-queries.safetensors",
    output:
        "results/runs/{system}/{dataset}/train.trec",
    log:
        "logs/sparse_search/{system}/{dataset}-train.log",
    benchmark:
        "results/benchmarks/sparse_search/{system}/{dataset}-train.tsv"
    resources:
        mem_mb=mem_mb("search", train=True),
    params:
        top_k=mining_depth,
        ignore_identical_ids=lookup(
            dpath="datasets/{dataset}/ignore_identical_ids", within=config
        ),
        kind=lookup(dpath="systems/{system}/type", within=config),
        settings=system_settings,
        index=sparse_index_settings,
