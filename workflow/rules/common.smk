import os
import sys

from snakemake.utils import min_version, validate

min_version("9.0")

# The library lives under src/: importable here and in every job (scripts run in their own
# processes, maybe in a conda env) even without `pip install -e .`.
sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from llmret import config as cfgcheck  # noqa: E402

cfgcheck.prepare_environment(os.path.join(workflow.basedir, "src"))

validate(config, "../schemas/config.schema.yaml")
cfgcheck.complete(config)
cfgcheck.check(config)

DATASETS = list(config["datasets"])
TABLE_SYSTEMS = cfgcheck.table_systems(config)
TABLE_DATASETS = cfgcheck.table_datasets(config)
BM25_SYSTEMS = cfgcheck.systems_of_type(config, "bm25")
DENSE_SYSTEMS = cfgcheck.systems_of_type(config, "dense")
PRETRAIN_RUNS = list(config["pretraining"])
cfgcheck.resolve_paths(config, workflow.basedir)


def one_of(names):
    """A wildcard regex matching exactly these names (never-matching when empty)."""
    import re

    return "|".join(re.escape(n) for n in names) or "(?!x)x"


wildcard_constraints:
    dataset=one_of(DATASETS),


def model_dir(name):
    """Checkpoint folder of a base model (imported) or of a pretraining run (trained)."""
    if name in config["models"]:
        return f"resources/models/{name}"
    return f"results/models/{name}"


def pretrain_spec(run):
    """A run's shard and objective settings (what PretrainSpec holds)."""
    skip = ("model", "corpora", "training", "gpus")
    return {k: v for k, v in config["pretraining"][run].items() if k not in skip}


def system_settings(wildcards):
    """A system's settings without its type: they reach scripts through params."""
    return {k: v for k, v in config["systems"][wildcards.system].items() if k != "type"}


def prepared(dataset, what):
    """Paths of the validated (and maybe subsampled) copy every system reads."""
    base = f"results/data/{dataset}"
    return {
        "corpus": f"{base}/corpus.jsonl",
        "queries": f"{base}/queries.jsonl",
        "qrels": f"{base}/qrels.tsv",
        "info": f"{base}/dataset.json",
    }[what]
