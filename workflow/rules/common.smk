import os
import sys
from types import SimpleNamespace

from snakemake.utils import min_version, validate

min_version("9.0")

# The library lives under src/: importable here and in every job (scripts run in their own
# processes, maybe in a conda env) even without `pip install -e .`.
sys.path.insert(0, os.path.join(workflow.basedir, "src"))
from llmret import checks  # noqa: E402
from llmret import plan  # noqa: E402
from llmret import launch  # noqa: E402
from llmret.data import sources  # noqa: E402
from llmret import sizing  # noqa: E402
from llmret import registry  # noqa: E402
from llmret.retrieval import corpus_shards  # noqa: E402
from llmret.retrieval import faiss_index  # noqa: E402

launch.prepare_environment(os.path.join(workflow.basedir, "src"))

checks.prefill(config)
validate(config, "../../src/llmret/config.schema.yaml")
plan.complete(config)
AUTO_GPUS = plan.resolve_gpus(config, launch.usable_gpu_count())
# Submitting to Slurm (a profile or executor named so) with the profile's gpus_auto dropped:
if (
    AUTO_GPUS
    and config.get("gpus_auto") is None
    and any("slurm" in arg for arg in sys.argv)
    and launch.slurm_submit_host()
):
    logger.warning(
        f"{len(AUTO_GPUS)} settings are gpus: auto ({', '.join(AUTO_GPUS[:3])}, ...), which "
        "this host, with Slurm's sbatch and no GPU of its own, resolves to 0 (CPU only). "
        "Under --workflow-profile profiles/slurm set gpus_auto (the profile's config sets 1; "
        "a --config on the command line replaces it: add gpus_auto=1 there) or give counts."
    )
plan.resolve_training(config)
checks.check(config)

DATASETS = list(config["datasets"])
FILE_DATASETS = [d for d in DATASETS if "files" in config["datasets"][d]]
ZIP_DATASETS = [d for d in DATASETS if d not in FILE_DATASETS]
RAW_FILES = sources.raw_files(config)
TABLE_SYSTEMS = plan.table_systems(config)
TABLE_DATASETS = plan.table_datasets(config)
# Systems by the family of rules that builds them (llmret.registry.SYSTEM_TYPES): bow
# systems (bag-of-words, no network) are encoded, indexed and searched as sparse ones.
BM25_SYSTEMS = registry.systems_of_family(config, "bm25")
DENSE_SYSTEMS = registry.systems_of_family(config, "dense")
SPARSE_SYSTEMS = registry.systems_of_family(config, "sparse")
BOW_SYSTEMS = plan.systems_of_type(config, "bow")
PRETRAIN_RUNS = list(config["pretraining"])
MINING = list(config["mining"])
MINING_FILES = [m for m in MINING if "file" in config["mining"][m]]
MINED = [m for m in MINING if m not in MINING_FILES]
MSMARCO_SYSTEMS = list(
    (config.get("msmarco_table") or {}).get("systems") or TABLE_SYSTEMS
)
INDEXED_SYSTEMS = [s for s in TABLE_SYSTEMS if s in DENSE_SYSTEMS + SPARSE_SYSTEMS]
INDEXED_CORPORA = list(
    dict.fromkeys(config["datasets"][d].get("corpus_from") or d for d in TABLE_DATASETS)
)
MSMARCO_COLUMNS = (config.get("msmarco_table") or {}).get("columns", [])
QUANT = config.get("quantization_table") or {}
QUANT_SYSTEMS = QUANT.get("systems", [])
QUANT_DATASET = QUANT.get("dataset") or TABLE_DATASETS[0]
QUANT_METRIC = QUANT.get("metric", config["table"]["metric"])
# Training runs behind what `all` builds: their loss plots and the training table.
USED_RUNS = plan.runs_used(config, TABLE_SYSTEMS + MSMARCO_SYSTEMS + QUANT_SYSTEMS)
plan.resolve_paths(config, workflow.basedir)
EXPECTED = checks.expected_cells(config)
EXPECTED_FILE = (config.get("expected") or {}).get("file", [])
# (system, dataset) pairs with an expected cell, in the order of check_expected's input.
EXPECTED_RUNS = sorted({(c.system, c.dataset) for c in EXPECTED})


def all_targets():
    """The targets of `all`, what a plain `snakemake` builds: the tables, their plots, the training runs'
    loss plots and table, and the optional tables and checks the config asks for."""
    targets = ["results/beir_table.csv", "results/plots/beir_table.png"]
    targets += expand("results/plots/{run}_loss.png", run=USED_RUNS)
    if USED_RUNS:
        targets.append("results/training_table.csv")
    if config.get("msmarco_table"):
        targets.append("results/msmarco_table.csv")
    if EXPECTED:
        targets.append("results/expected_check.tsv")
    if INDEXED_SYSTEMS:
        targets.append("results/index_sizes.csv")
    if QUANT:
        targets += [
            "results/quantization_table.csv",
            "results/plots/quantization_table.png",
        ]
    return targets


def one_of(names):
    """A wildcard regex matching exactly these names (never-matching when empty)."""
    import re

    return "|".join(re.escape(n) for n in names) or "(?!x)x"


wildcard_constraints:
    dataset=one_of(DATASETS),


def dataset_file_names(dataset):
    """Local download names of a files-dataset's raw files."""
    layout = sources.dataset_files(config["datasets"][dataset])
    names = [layout["corpus"]["file"]]
    for pair in layout["splits"].values():
        names += [pair["queries"]["file"], pair["qrels"]["file"]]
    return names


# The download rules' files (each with its record, llmret.data.sources.record_path).
DOWNLOADS = {
    "dataset": "resources/downloads/{dataset}.zip",
    "file": "resources/downloads/files/{file}",
    "negatives": "resources/downloads/{mining}.tevatron",
    "dpr_wiki": "resources/downloads/psgs_w100.tsv.gz",
}


def download_md5(kind):
    """Params function: a download job's md5 param, its rerun key (llmret.data.sources.md5_key):
    the key its file was verified with while the config still accepts that file's md5, so
    accepting a second md5 reruns nothing downstream; the job checks the config's whole list.
    """

    def key(wildcards):
        entry = sources.download_source(config, kind, dict(wildcards))
        return sources.md5_key(entry["md5"], DOWNLOADS[kind].format(**dict(wildcards)))

    return key


def model_of(section, wildcard):
    """Input function: the checkpoint folder of the model a config entry names (the entry
    of ``section`` that the job's ``wildcard`` selects)."""
    return lambda wc: model_dir(config[section][getattr(wc, wildcard)]["model"])


def runs_of_rule(rule):
    """The training runs (of any stage, llmret.registry) that ``rule`` trains."""
    return [run for run, stage, _ in registry.runs(config) if stage.rule == rule]


def run_base_model(wildcards):
    """The checkpoint folder a training run starts from."""
    return model_dir(registry.run_entry(config, wildcards.run)["model"])


def run_data(wildcards):
    """The file a training run trains on (its stage's data source)."""
    run = wildcards.run
    return registry.stage_of(config, run).data_path(
        run, registry.run_entry(config, run)
    )


def run_deepspeed(wildcards):
    return registry.run_entry(config, wildcards.run)["training"]["deepspeed_config"]


def run_gpus(wildcards):
    return registry.run_entry(config, wildcards.run)["gpus"]


def run_spec(wildcards):
    """A run's own settings (what its stage's dataclass holds; not its base model, data,
    LoRA, training or GPUs, which reach the job otherwise), as its rerun keys."""
    stage = registry.stage_of(config, wildcards.run)
    return plan.rerun_settings(stage.section, config[stage.section][wildcards.run])


def run_tokenization(wildcards):
    """A run's tokenisation tag (see tokenization below)."""
    section = registry.stage_of(config, wildcards.run).section
    return tokenization(section, "run")(wildcards)


def run_lora(wildcards):
    """A LoRA stage's ``lora`` block ({} for a full-weight stage)."""
    return dict(registry.run_entry(config, wildcards.run).get("lora") or {})


def run_training(wildcards):
    """A run's training settings without those that do not change the model: the DeepSpeed
    file's path (the file is an input, its content triggers reruns, so moving the checkout
    does not retrain) and checkpoint retention (the job reads it from the config). The
    global batch check travels only when set, so runs without one keep their params."""
    training = registry.run_entry(config, wildcards.run)["training"]
    return {
        k: v
        for k, v in training.items()
        if k not in ("deepspeed_config", "keep_checkpoints")
        and not (k == "global_batch_size" and v is None)
    }


def mining_dataset(wildcards):
    """The dataset whose training split a mining entry mines."""
    return config["mining"][wildcards.mining]["dataset"]


def model_source(wildcards):
    """A base model's import settings: not the sizes that only plan memory requests."""
    model = config["models"][wildcards.model]
    return {k: v for k, v in model.items() if k not in sizing.PLANNING_KEYS}


def mem_mb(kind, **fixed):
    """Resource function: a job's host memory in MB by llmret.sizing's formula for ``kind``
    (encode, index, search, train) from the job's wildcards."""

    def request(wc):
        if kind == "import":
            return sizing.import_mb(config, wc.model)
        if kind == "train":
            return sizing.training_mb(config, wc.run, run_gpus(wc))
        count = len(corpus_shards(wc.dataset))
        corpus = corpus_of(wc.dataset)
        if kind == "encode":
            return sizing.encode_mb(config, wc.system, corpus, count)
        if kind == "index":
            return sizing.index_mb(config, wc.system, corpus, count)
        k = (mining_depth(wc) if fixed["train"] else config["evaluation"]["top_k"]) + 1
        return sizing.search_mb(config, wc.system, corpus, count, k, fixed["train"])

    return request


def model_dir(name):
    """Checkpoint folder of a base model (imported) or of a pretraining or fine-tuning
    run (trained)."""
    if name in config["models"]:
        return f"resources/models/{name}"
    return f"results/models/{name}"


def dpr_wiki_input(run):
    """The DPR Wikipedia file a pretraining run reads: the whole download, or a streamed
    prefix of max_passages passages; [] when the run does not use it."""
    dpr = config["pretraining"][run].get("dpr_wiki")
    if dpr is None:
        return []
    if dpr["max_passages"] is None:
        return ["resources/downloads/psgs_w100.tsv.gz"]
    return [f"resources/pretraining/dpr-wiki-first{dpr['max_passages']}.tsv"]


def pretrain_spec(run):
    """A pretraining run's shard and objective settings, defaults resolved (its rerun keys)."""
    return plan.rerun_settings("pretraining", config["pretraining"][run])


def system_settings(wildcards):
    """A system's encoder/scorer settings for the job's dataset (not its type, index or
    GPUs): they reach scripts through params, so changing the index type does not re-encode.
    """
    return plan.system_settings(
        config, wildcards.system, getattr(wildcards, "dataset", None)
    )


def bow_corpus(wildcards):
    """A bow system's corpus shard vectors (its search weighs queries by their idf); [] else."""
    if wildcards.system not in BOW_SYSTEMS:
        return []
    return shard_files("sparse", "corpus", ".safetensors")(wildcards)


def dense_index(system):
    """A dense system's ``index`` config (llmret.retrieval.faiss_index.IndexSpec); {} = exact."""
    return dict(config["systems"][system].get("index") or {})


def index_settings(wildcards):
    """The evaluation queries' search settings: the system's index config but ``mining``."""
    return {k: v for k, v in dense_index(wildcards.system).items() if k != "mining"}


def mining_index_settings(wildcards):
    """The training queries' search settings: ``mining``'s keys over the evaluation's."""
    return {
        **index_settings(wildcards),
        **(dense_index(wildcards.system).get("mining") or {}),
    }


def index_build(wildcards):
    """What a FAISS file of a folder is built from (type and build settings, defaults
    resolved), so a search-time setting (nprobe, ef_search) never rebuilds it."""
    spec = faiss_index.folder_spec(dense_index(wildcards.system), wildcards.folder)
    return spec.build_settings()


def mining_gpus(wildcards):
    """GPUs of a training-query search: one when the system has any and the search is exact
    (unless ``use_gpu: false``); approximate search runs on the CPU."""
    spec = faiss_index.IndexSpec.from_config(dense_index(wildcards.system)).for_mining()
    gpus = config["systems"][wildcards.system]["gpus"]
    return min(1, gpus) if spec.exact and spec.use_gpu else 0


def sparse_index_settings(wildcards):
    """A sparse system's index settings (llmret.retrieval.sparse_index.SparseIndexSpec); {} = exact."""
    return dict(config["systems"][wildcards.system].get("sparse_index") or {})


def mining_depth(wildcards):
    """Retrieval depth for a (retriever, dataset)'s training queries: the deepest any
    mining spec using them asks for."""
    depths = [
        m["depth"]
        for m in config["mining"].values()
        if m.get("retriever") == wildcards.system
        and m.get("dataset") == wildcards.dataset
    ]
    if not depths:
        raise ValueError(
            f"no mining spec retrieves with {wildcards.system} on {wildcards.dataset}"
        )
    return max(depths)


def mining_settings(wildcards):
    """What llmret.training.mining.MiningSpec takes (everything but the dataset and retriever)."""
    return plan.entry_settings("mining", config["mining"][wildcards.mining])


def mined_run(wildcards):
    m = config["mining"][wildcards.mining]
    return f"results/runs/{m['retriever']}/{m['dataset']}/train.trec"


def tokenization(section, key):
    """A job's tokenisation tag (llmret.retrieval.tokenization.tokenization_of) for the
    entry of ``section`` its wildcard ``key`` names: "joint" where a template puts a prompt
    before the text, so encodings tokenised the old way are made again; "" elsewhere."""

    def tag(wildcards):
        entry = config[section][getattr(wildcards, key)]
        kind = f"systems.{entry['type']}" if section == "systems" else section
        return plan.entry_tokenization(kind, entry)

    return tag


def corpus_of(dataset):
    """The dataset whose corpus index a dataset searches: itself, or its corpus_from
    (TREC DL19/DL20 and MS MARCO dev share one 8.8M-passage index)."""
    return config["datasets"][dataset].get("corpus_from") or dataset


def index_path(wc, kind):
    return f"results/index/{wc.system}/{corpus_of(wc.dataset)}/{kind}"


SHARD_PATTERN = corpus_shards.SHARD_PATTERN


def corpus_shards(dataset):
    """Shard names of the corpus a dataset searches (llmret.retrieval.corpus_shards)."""
    return plan.corpus_shards(config, corpus_of(dataset))


def shard_files(top, folder, suffix):
    """Input function: one file per corpus shard of the job's system and dataset, under
    results/{top}/{system}/{corpus}/{folder}/, in shard order."""
    return lambda wc: [
        f"results/{top}/{wc.system}/{corpus_of(wc.dataset)}/{folder}/{shard}{suffix}"
        for shard in corpus_shards(wc.dataset)
    ]


def family_of(system):
    """The rule family (bm25, dense, sparse) that builds a system's runs."""
    return registry.system_type(config["systems"][system]["type"]).family


def search_shards(mining):
    """Input function: what a dense search reads per corpus shard: the stored vectors for
    exact search, the FAISS files of its folder (llmret.retrieval.faiss_index.index_folder)
    for ivf/hnsw; for the training queries with ``mining``."""

    def files(wc):
        folder = faiss_index.index_folder(dense_index(wc.system), mining)
        if folder is None:
            return shard_files("embeddings", "corpus", ".npy")(wc)
        return shard_files("index", folder, ".index")(wc)

    return files


def system_index(system, dataset):
    """The index (one entry per shard) a system searches for a dataset's evaluation queries:
    a dense system's FAISS files, or its stored vectors for exact search; a sparse
    system's index folders."""
    wc = SimpleNamespace(system=system, dataset=dataset)
    if family_of(system) == "dense":
        return search_shards(mining=False)(wc)
    return shard_files("index", "sparse", "")(wc)


def corpus_stats(system, dataset):
    """The statistics JSON of a system's corpus encoding (throughput, weight size)."""
    folder = {"dense": "embeddings", "sparse": "sparse"}[family_of(system)]
    return f"results/{folder}/{system}/{corpus_of(dataset)}/corpus.json"


def prepared(dataset, what):
    """Paths of the validated (and maybe subsampled) copy every system reads, and of the
    training split (train-queries, train-qrels, train-info) that mining reads."""
    base = f"results/data/{dataset}"
    return {
        "corpus": f"{base}/corpus.jsonl",
        "queries": f"{base}/queries.jsonl",
        "qrels": f"{base}/qrels.tsv",
        "info": f"{base}/dataset.json",
        "train-queries": f"{base}/train/queries.jsonl",
        "train-qrels": f"{base}/train/qrels.tsv",
        "train-info": f"{base}/train/split.json",
    }[what]
