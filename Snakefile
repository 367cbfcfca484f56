# Rebuild LLM-retriever papers' tables (LLaRA, CSPLADE) end to end.
#   snakemake --cores all results/beir_table.csv
# See README.md; the design is in docs/design.md.


import os


# The embedded default; presets and --config are merged on top of it.
configfile: os.path.join(workflow.basedir, "config", "config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/bm25.smk"
include: "workflow/rules/dense.smk"
include: "workflow/rules/llara.smk"
include: "workflow/rules/mining.smk"
include: "workflow/rules/sparse.smk"
include: "workflow/rules/training.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    input:
        all_targets(),
