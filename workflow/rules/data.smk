# Datasets: download (verified, atomic), unpack (safe), validate and maybe subsample.


localrules:
    download_dataset,
    download_file,


rule download_dataset:
    """Fetch a dataset zip from its URL or the mirror; the md5 pins the content, so the
    mirror location is read from the config and is deliberately not a rerun trigger; nor
    is another accepted md5 while the file on disk has one (download_md5)."""
    output:
        DOWNLOADS["dataset"],
        record=DOWNLOADS["dataset"] + sources.RECORD_SUFFIX,
    log:
        "logs/download/{dataset}.log",
    wildcard_constraints:
        dataset=one_of(ZIP_DATASETS),
    conda:
        "../../envs/retrieval.yaml"
    resources:
        downloads=1,
    params:
        kind="dataset",
        md5=download_md5("dataset"),
    script:
        "../scripts/download_dataset.py"


rule download_file:
    """One raw file of a files-dataset (MS MARCO's official TSVs, TREC qrels), fetched
    once however many datasets read it; md5-verified like the zips."""
    output:
        DOWNLOADS["file"],
        record=DOWNLOADS["file"] + sources.RECORD_SUFFIX,
    log:
        "logs/download/files/{file}.log",
    wildcard_constraints:
        file=one_of(RAW_FILES),
    conda:
        "../../envs/retrieval.yaml"
    resources:
        downloads=1,
    params:
        kind="file",
        md5=download_md5("file"),
    script:
        "../scripts/download_dataset.py"


rule assemble_dataset:
    """The BEIR layout from raw files: corpus, every split's queries, TREC qrels."""
    input:
        lambda wc: sorted(
            {f"resources/downloads/files/{f}" for f in dataset_file_names(wc.dataset)}
        ),
    output:
        directory("resources/datasets/{dataset}"),
    log:
        "logs/assemble/{dataset}.log",
    wildcard_constraints:
        dataset=one_of(FILE_DATASETS),
    conda:
        "../../envs/retrieval.yaml"
    params:
        layout=lambda wc: sources.dataset_files(config["datasets"][wc.dataset]),
    script:
        "../scripts/assemble_dataset.py"


rule unpack_dataset:
    input:
        "resources/downloads/{dataset}.zip",
    output:
        directory("resources/datasets/{dataset}"),
    log:
        "logs/unpack/{dataset}.log",
    wildcard_constraints:
        dataset=one_of(ZIP_DATASETS),
    conda:
        "../../envs/retrieval.yaml"
    params:
        folder=lookup(dpath="datasets/{dataset}/zip_folder", within=config),
    script:
        "../scripts/unpack_dataset.py"


rule prepare_dataset:
    """Validate the BEIR files (file and line named on error), keep the evaluation split's
    judged queries, apply the preset's subsampling, and write the copy systems read."""
    input:
        "resources/datasets/{dataset}",
    output:
        corpus="results/data/{dataset}/corpus.jsonl",
        queries="results/data/{dataset}/queries.jsonl",
        qrels="results/data/{dataset}/qrels.tsv",
        info="results/data/{dataset}/dataset.json",
    log:
        "logs/prepare/{dataset}.log",
    conda:
        "../../envs/retrieval.yaml"
    params:
        split=lookup(dpath="datasets/{dataset}/split", within=config),
        on_unknown=lookup(dpath="datasets/{dataset}/on_unknown_qrels", within=config),
        subsample=lookup(dpath="datasets/{dataset}/subsample", within=config),
    script:
        "../scripts/prepare_dataset.py"


localrules:
    trec_qrels,


rule trec_qrels:
    """The evaluation split's judgements in TREC format (qid 0 docid grade): what the
    evaluation reads, and trec_eval, ir_measures or ranx take as they are."""
    input:
        lambda wc: prepared(wc.dataset, "qrels"),
    output:
        "results/data/{dataset}/qrels.trec",
    log:
        "logs/prepare/{dataset}-qrels.log",
    conda:
        "../../envs/retrieval.yaml"
    script:
        "../scripts/trec_qrels.py"
