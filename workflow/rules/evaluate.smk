# Evaluation with ranx, and the paper-style tables.


# How a family's runs are searched beyond the system's settings (the search rule's ``index``
# params); BM25's index is its settings.
SEARCH_INDEX = {"dense": index_settings, "sparse": sparse_index_settings}
# What each (system, dataset) metrics file is computed with (``settings`` in the file): the
# run's settings as its search rule passes them (the run's record keeps them) and the
# evaluation's. The evaluate rule checks a run's record against "run". As the tables' params
# ("cells") they rerun a table whenever a setting behind one of its cells changes, even when
# the job that took the change first failed: Snakemake 9 records a failed job's params as
# done and leaves a missing intermediate file missing. The tables check each file by them.
EVALUATED_WITH = {
    (s, d): {
        "run": {
            "top_k": config["evaluation"]["top_k"],
            "ignore_identical_ids": config["datasets"][d]["ignore_identical_ids"],
            "settings": plan.system_settings(config, s, d),
        }
        | (
            {"index_settings": SEARCH_INDEX[family_of(s)](SimpleNamespace(system=s))}
            if family_of(s) in SEARCH_INDEX
            else {}
        ),
        "metrics": list(config["evaluation"]["metrics"]),
        "relevance_level": config["datasets"][d]["relevance_level"],
    }
    for s in config["systems"]
    for d in DATASETS
}


# Seconds of work each: on a cluster they run on the submitting host, not as jobs.
localrules:
    evaluate,
    beir_table,
    plot_table,


rule evaluate:
    """A run's metrics; the run is checked against its record (complete) and the config's
    settings (``run``: not stale), the qrels for something relevant."""
    input:
        run="results/runs/{system}/{dataset}.trec",
        qrels="results/data/{dataset}/qrels.trec",
    output:
        "results/metrics/{system}/{dataset}.json",
    log:
        "logs/evaluate/{system}/{dataset}.log",
    conda:
        "../../envs/evaluation.yaml"
    params:
        metrics=config["evaluation"]["metrics"],
        relevance_level=lookup(
            dpath="datasets/{dataset}/relevance_level", within=config
        ),
        run=lambda wc: EVALUATED_WITH[(wc.system, wc.dataset)]["run"],
    script:
        "../scripts/evaluate.py"


rule beir_table:
    input:
        metrics=expand(
            "results/metrics/{system}/{dataset}.json",
            system=TABLE_SYSTEMS,
            dataset=TABLE_DATASETS,
        ),
        runs=expand(
            "results/runs/{system}/{dataset}.trec",
            system=TABLE_SYSTEMS,
            dataset=TABLE_DATASETS,
        ),
        qrels=expand("results/data/{dataset}/qrels.trec", dataset=TABLE_DATASETS),
        info=[prepared(d, "info") for d in TABLE_DATASETS],
    output:
        table=report(
            "results/beir_table.csv",
            category="Tables",
            caption="../report/beir_table.rst",
        ),
        full=report(
            "results/beir_table_full.csv",
            category="Tables",
            caption="../report/beir_table_full.rst",
        ),
        meta="results/beir_table.meta.json",
    log:
        "logs/beir_table.log",
    conda:
        "../../envs/evaluation.yaml"
    params:
        systems=TABLE_SYSTEMS,
        datasets=TABLE_DATASETS,
        metric=config["table"]["metric"],
        metrics=config["evaluation"]["metrics"],
        baseline=config["evaluation"]["baseline"],
        test=config["evaluation"]["test"],
        relevance_levels={
            d: config["datasets"][d]["relevance_level"] for d in TABLE_DATASETS
        },
        cells={
            f"{s}/{d}": EVALUATED_WITH[(s, d)]
            for s in TABLE_SYSTEMS
            for d in TABLE_DATASETS
        },
        data={
            d: {
                k: config["datasets"][d].get(k)
                for k in ("split", "on_unknown_qrels", "subsample")
            }
            for d in TABLE_DATASETS
        },
    script:
        "../scripts/beir_table.py"


rule plot_table:
    input:
        "results/beir_table.csv",
    output:
        report(
            "results/plots/beir_table.png",
            category="Plots",
            caption="../report/beir_plot.rst",
        ),
    log:
        "logs/plot_table.log",
    conda:
        "../../envs/evaluation.yaml"
    params:
        metric=config["table"]["metric"],
    script:
        "../scripts/plot_table.py"


localrules:
    msmarco_table,


rule msmarco_table:
    """The MS MARCO-style table: each column its own (dataset, metric), e.g. dev
    MRR@10, dev Recall@1000 and TREC DL19 nDCG@10."""
    input:
        metrics=[
            f"results/metrics/{s}/{c['dataset']}.json"
            for s in MSMARCO_SYSTEMS
            for c in MSMARCO_COLUMNS
        ],
    output:
        table=report(
            "results/msmarco_table.csv",
            category="Tables",
            caption="../report/msmarco_table.rst",
        ),
    log:
        "logs/msmarco_table.log",
    conda:
        "../../envs/evaluation.yaml"
    params:
        systems=MSMARCO_SYSTEMS,
        columns=MSMARCO_COLUMNS,
        cells={
            f"{s}/{c['dataset']}": EVALUATED_WITH[(s, c["dataset"])]
            for s in MSMARCO_SYSTEMS
            for c in MSMARCO_COLUMNS
        },
    script:
        "../scripts/column_table.py"


localrules:
    check_expected,


rule check_expected:
    """Each expected (system, dataset, metric) cell against this run's metrics: a TSV
    with expected, measured, delta and ok / drift-up / drift-down; with on_drift
    error the job fails and its log names every drifting cell."""
    input:
        expected=EXPECTED_FILE,
        metrics=[f"results/metrics/{s}/{d}.json" for s, d in EXPECTED_RUNS],
    output:
        "results/expected_check.tsv",
    log:
        "logs/check_expected.log",
    conda:
        "../../envs/evaluation.yaml"
    params:
        runs=EXPECTED_RUNS,
        cells={f"{s}/{d}": EVALUATED_WITH[(s, d)] for s, d in EXPECTED_RUNS},
        on_drift=lookup(dpath="expected/on_drift", within=config, default="error"),
    script:
        "../scripts/check_expected.py"


localrules:
    index_sizes,


rule index_sizes:
    """Index size on disk of every learned system of the table, sparse inverted indexes
    next to FAISS indexes."""
    input:
        indexes=[
            path
            for s in INDEXED_SYSTEMS
            for d in INDEXED_CORPORA
            for path in system_index(s, d)
        ],
    output:
        report(
            "results/index_sizes.csv",
            category="Tables",
            caption="../report/index_sizes.rst",
        ),
    log:
        "logs/index_sizes.log",
    conda:
        "../../envs/retrieval.yaml"
    params:
        entries=[
            (s, config["systems"][s]["type"], d, len(corpus_shards(d)))
            for s in INDEXED_SYSTEMS
            for d in INDEXED_CORPORA
        ],
    script:
        "../scripts/index_sizes.py"


localrules:
    training_table,


rule training_table:
    """Steps, training time and peak memory of every training run behind the tables."""
    input:
        models=[model_dir(r) for r in USED_RUNS],
    output:
        report(
            "results/training_table.csv",
            category="Tables",
            caption="../report/training_table.rst",
        ),
    log:
        "logs/training_table.log",
    conda:
        "../../envs/evaluation.yaml"
    params:
        entries=plan.run_stages(config, USED_RUNS),
    script:
        "../scripts/training_table.py"


localrules:
    corpus_stats,


rule corpus_stats:
    """A corpus's encoding figures (throughput, weight size) from its shards'."""
    input:
        shards=lambda wc: [
            f"results/{wc.folder}/{wc.system}/{wc.dataset}/corpus/{shard}.json"
            for shard in corpus_shards(wc.dataset)
        ],
    output:
        "results/{folder}/{system}/{dataset}/corpus.json",
    log:
        "logs/corpus_stats/{folder}/{system}/{dataset}.log",
    wildcard_constraints:
        folder="embeddings|sparse",
    conda:
        "../../envs/evaluation.yaml"
    script:
        "../scripts/corpus_stats.py"


localrules:
    quantization_table,


rule quantization_table:
    """Precision, encoder weight size, corpus encoding throughput, index size and a
    metric, per system: the CSPLADE paper's quantization trade-off."""
    input:
        stats=[corpus_stats(s, QUANT_DATASET) for s in QUANT_SYSTEMS],
        indexes=[path for s in QUANT_SYSTEMS for path in system_index(s, QUANT_DATASET)],
        metrics=[f"results/metrics/{s}/{QUANT_DATASET}.json" for s in QUANT_SYSTEMS],
    output:
        table=report(
            "results/quantization_table.csv",
            category="Tables",
            caption="../report/quantization_table.rst",
        ),
        plot=report(
            "results/plots/quantization_table.png",
            category="Plots",
            caption="../report/quantization_plot.rst",
        ),
    log:
        "logs/quantization_table.log",
    conda:
        "../../envs/evaluation.yaml"
    params:
        systems=QUANT_SYSTEMS,
        dataset=QUANT_DATASET,
        shards=len(corpus_shards(QUANT_DATASET)),
        metric=QUANT_METRIC,
        cells={
            f"{s}/{QUANT_DATASET}": EVALUATED_WITH[(s, QUANT_DATASET)]
            for s in QUANT_SYSTEMS
        },
    script:
        "../scripts/quantization_table.py"
