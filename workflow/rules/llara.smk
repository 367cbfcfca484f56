# LLaRA pretraining: (text, next text) pairs from the corpora's documents (no labels) and
# from DPR's Wikipedia passages (whole file, or a streamed prefix), tokenized into a fixed
# number of shards (one job each), then EBAE/EBAR training with DeepSpeed (llara_pretrain,
# in training.smk). Checkpoints live in results/checkpoints/{run} (undeclared), so a killed
# job rerun resumes; only the final HF checkpoint is the declared (protected) output.


# Downloads need the internet (often absent on compute nodes; see `mirror`); the manifest
# and the loss plot are seconds of work.
localrules:
    download_dpr_wiki,
    stream_dpr_wiki,
    llara_manifest,
    plot_train_log,


rule download_dpr_wiki:
    """The whole psgs_w100.tsv.gz (4.7 GB), checked against sources.dpr_wiki.md5."""
    output:
        DOWNLOADS["dpr_wiki"],
        record=DOWNLOADS["dpr_wiki"] + sources.RECORD_SUFFIX,
    log:
        "logs/download/dpr_wiki.log",
    conda:
        "../../envs/retrieval.yaml"
    resources:
        downloads=1,
    params:
        kind="dpr_wiki",
        md5=download_md5("dpr_wiki"),
    script:
        "../scripts/download_dataset.py"


rule stream_dpr_wiki:
    """The first {n} passages only, streamed: a preset's share without the 4.7 GB file.
    Its sha256 goes to the .json beside it (a prefix has no published checksum)."""
    output:
        tsv="resources/pretraining/dpr-wiki-first{n}.tsv",
        info="resources/pretraining/dpr-wiki-first{n}.json",
    log:
        "logs/download/dpr_wiki-first{n}.log",
    wildcard_constraints:
        n=r"[1-9]\d*",
    conda:
        "../../envs/retrieval.yaml"
    resources:
        downloads=1,
    params:
        # No checksum pins a prefix (its sha256 is recorded after): the URL is what names it.
        url=config["sources"]["dpr_wiki"]["url"],
    script:
        "../scripts/stream_dpr_wiki.py"


rule llara_shard:
    input:
        model=model_of("pretraining", "run"),
        corpora=lambda wc: [
            prepared(d, "corpus") for d in config["pretraining"][wc.run]["corpora"]
        ],
        dpr=lambda wc: dpr_wiki_input(wc.run),
    output:
        "results/shards/{run}/shard-{shard}.safetensors",
    log:
        "logs/llara_shard/{run}/{shard}.log",
    benchmark:
        "results/benchmarks/llara_shard/{run}/{shard}.tsv"
    wildcard_constraints:
        run=one_of(PRETRAIN_RUNS),
        shard=r"\d+",
    conda:
        "../../envs/training.yaml"
    params:
        spec=lambda wc: pretrain_spec(wc.run),
    script:
        "../scripts/llara_shard.py"


rule llara_manifest:
    input:
        lambda wc: expand(
            "results/shards/{run}/shard-{shard}.safetensors",
            run=wc.run,
            shard=range(pretrain_spec(wc.run)["shards"]),
        ),
    output:
        "results/shards/{run}/manifest.json",
    log:
        "logs/llara_manifest/{run}.log",
    wildcard_constraints:
        run=one_of(PRETRAIN_RUNS),
    conda:
        "../../envs/training.yaml"
    script:
        "../scripts/llara_manifest.py"
