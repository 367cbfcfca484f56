# Rebuild LLM-retriever papers' tables (LLaRA, CSPLADE) end to end.
#   snakemake --cores all results/beir_table.csv
# See README.md; the design is in ../shared/DESIGN.md.


import os


# The embedded default; presets and --config are merged on top of it.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/bm25.smk"
include: "workflow/rules/dense.smk"
include: "workflow/rules/llara.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/sparse.smk"
include: "workflow/rules/csplade.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        "results/beir_table.csv",
        "results/plots/beir_table.png",
        expand("results/plots/{run}_loss.png", run=USED_RUNS),
        ["results/training_table.csv"] if USED_RUNS else [],
        ["results/msmarco_table.csv"] if config.get("msmarco_table") else [],
        ["results/expected_check.tsv"] if EXPECTED else [],
        ["results/index_sizes.csv"] if INDEXED_SYSTEMS else [],
        (
            ["results/quantization_table.csv", "results/plots/quantization_table.png"]
            if QUANT
            else []
        ),
