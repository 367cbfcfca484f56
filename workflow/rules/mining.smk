# Hard negatives for the contrastive stages (RepLLaMA fine-tuning, CSPLADE): the training
# split, a retriever's run over the training queries, negatives from a rank window (Tevatron
# JSONL), or a released file. Mining and training are separate cached targets, so a training
# setting never re-mines (the training rules: training.smk).


rule prepare_train_split:
    """Training queries with their positives; a query judged in the evaluation split too
    is an error (label leakage)."""
    input:
        "resources/datasets/{dataset}",
    output:
        queries="results/data/{dataset}/train/queries.jsonl",
        qrels="results/data/{dataset}/train/qrels.tsv",
        info="results/data/{dataset}/train/split.json",
    log:
        "logs/prepare_train/{dataset}.log",
    conda:
        "../../envs/retrieval.yaml"
    params:
        train=lookup(dpath="datasets/{dataset}/train", within=config),
        eval_split=lookup(dpath="datasets/{dataset}/split", within=config),
    script:
        "../scripts/prepare_train_split.py"


use rule bm25_search as bm25_search_train with:
    input:
        index=lambda wc: index_path(wc, "bm25"),
        queries=lambda wc: prepared(wc.dataset, "train-queries"),
    output:
        "results/runs/{system}/{dataset}/train.trec",
    log:
        "logs/bm25_search/{system}/{dataset}-train.log",
    benchmark:
        "results/benchmarks/bm25_search/{system}/{dataset}-train.tsv"
    params:
        top_k=mining_depth,
        ignore_identical_ids=lookup(
            dpath="datasets/{dataset}/ignore_identical_ids", within=config
        ),


use rule dense_search as dense_search_train with:
    input:
        shards=search_shards(mining=True),
        doc_ids=shard_files("embeddings", "corpus", ".ids"),
        queries="results/embeddings/{system}/{dataset}/train-queries.npy",
        query_ids="results/embeddings/{system}/{dataset}/train-queries.ids",
    output:
        "results/runs/{system}/{dataset}/train.trec",
    log:
        "logs/dense_search/{system}/{dataset}-train.log",
    benchmark:
        "results/benchmarks/dense_search/{system}/{dataset}-train.tsv"
    threads: 8
    resources:
        mem_mb=mem_mb("search", train=True),
        gpu=mining_gpus,
    params:
        top_k=mining_depth,
        ignore_identical_ids=lookup(
            dpath="datasets/{dataset}/ignore_identical_ids", within=config
        ),
        settings=system_settings,
        index=mining_index_settings,


rule mine_negatives:
    input:
        run=mined_run,
        queries=lambda wc: prepared(mining_dataset(wc), "train-queries"),
        qrels=lambda wc: prepared(mining_dataset(wc), "train-qrels"),
        corpus=lambda wc: f"resources/datasets/{mining_dataset(wc)}",
    output:
        negatives="results/mining/{mining}/negatives.jsonl",
        stats="results/mining/{mining}/stats.json",
    log:
        "logs/mine_negatives/{mining}.log",
    benchmark:
        "results/benchmarks/mine_negatives/{mining}.tsv"
    wildcard_constraints:
        mining=one_of(MINED),
    conda:
        "../../envs/retrieval.yaml"
    params:
        spec=mining_settings,
    script:
        "../scripts/mine_negatives.py"


localrules:
    download_negatives,


rule download_negatives:
    """A released Tevatron training file (negatives mined elsewhere), md5-checked."""
    output:
        DOWNLOADS["negatives"],
        record=DOWNLOADS["negatives"] + sources.RECORD_SUFFIX,
    log:
        "logs/download/{mining}.log",
    wildcard_constraints:
        mining=one_of(MINING_FILES),
    conda:
        "../../envs/retrieval.yaml"
    resources:
        downloads=1,
    params:
        kind="negatives",
        md5=download_md5("negatives"),
    script:
        "../scripts/download_dataset.py"


rule import_negatives:
    """Validate the released file and publish it where mined negatives go."""
    input:
        "resources/downloads/{mining}.tevatron",
    output:
        negatives="results/mining/{mining}/negatives.jsonl",
        stats="results/mining/{mining}/stats.json",
    log:
        "logs/import_negatives/{mining}.log",
    wildcard_constraints:
        mining=one_of(MINING_FILES),
    conda:
        "../../envs/retrieval.yaml"
    script:
        "../scripts/import_negatives.py"
