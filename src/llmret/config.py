"""Cross-checks of the workflow config that a JSON schema cannot express.

The schema (``workflow/schemas/config.schema.yaml``) checks shapes and fills defaults;
this module checks references between sections (a system naming an unknown model, a
table naming an unknown dataset) so a typo stops before any job runs, with the setting
named.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from llmret.data.sources import raw_files
from llmret.specs import ConfigError, own_settings

SYSTEM_TYPES = ("bm25", "dense", "sparse", "bow")
# Settings a dense system must share with the fine-tuning run whose model it encodes with.
ENCODER_KEYS_FROM_TRAINING = ("query_template", "passage_template", "append_eos", "pooling", "normalize")
# ... and a sparse system with the CSPLADE run it encodes with (llmret.retrieval.sparse_encoder.MODEL_KEYS less
# the max lengths, which a system may choose, as a dense one may).
SPARSE_KEYS_FROM_TRAINING = ("query_template", "passage_template", "append_eos", "echo", "bidirectional")
TRAINING_SECTIONS = ("pretraining", "finetuning", "adaptation", "csplade")
# Names that become file and folder names (results/models/{run}, resources/datasets/{dataset},
# ...): a letter or digit first, so never ".", ".." or an option-like "-x"; no "/", spaces or
# glob characters. The schema's $defs/name carries the same pattern (a test checks).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$"
# Sections that turn on an output or a check; null switches one off.
OPTIONAL_SECTIONS = ("expected", "msmarco_table", "quantization_table")
NAMED_SECTIONS = ("datasets", "models", "systems", "mining", *TRAINING_SECTIONS)

# The dataclass behind each config entry: the schema's keys for it are its fields plus the
# workflow's wiring (tests/test_schema_specs.py checks keys, defaults and bounds agree).
SPEC_CLASSES = {
    "systems.bm25": "llmret.retrieval.bm25:BM25Params",
    "systems.dense": "llmret.retrieval.encoder:EncoderSpec",
    "systems.sparse": "llmret.retrieval.sparse_encoder:SparseEncoderSpec",
    "systems.bow": "llmret.retrieval.bow:BowSpec",
    "systems.dense.index": "llmret.retrieval.faiss_index:IndexSpec",
    "systems.sparse.sparse_index": "llmret.retrieval.sparse_index:SparseIndexSpec",
    "models": "llmret.retrieval.model_import:ModelSource",
    "pretraining": "llmret.llara.pretraining:PretrainSpec",
    "mining": "llmret.training.mining:MiningSpec",
    "finetuning": "llmret.finetuning.repllama:FinetuningSpec",
    "adaptation": "llmret.csplade.adaptation:AdaptationSpec",
    "csplade": "llmret.csplade.sparse_training:CspladeSpec",
    "lora": "llmret.training.lora:LoraSpec",
    "training": "llmret.training.arguments:TrainingArgs",
}


def spec_class(entry: str) -> type:
    """The dataclass of a config entry (a key of :data:`SPEC_CLASSES`), imported on demand."""
    import importlib

    module, _, name = SPEC_CLASSES[entry].partition(":")
    return getattr(importlib.import_module(module), name)


def entry_settings(entry: str, mapping: Mapping) -> dict:
    """The settings of a config entry that its dataclass holds (what a job's params carry)."""
    return own_settings(spec_class(entry), mapping)


def entry_tokenization(entry: str, mapping: Mapping) -> str:
    """:func:`llmret.retrieval.tokenization.tokenization_of` for a config entry (its dataclass
    with the schema's defaults filled in)."""
    from llmret.retrieval.tokenization import tokenization_of

    return tokenization_of(spec_class(entry)(**entry_settings(entry, mapping)))


def check_names(config: Mapping) -> None:
    """Refuse a name that would not be a plain file name, before anything uses it as a path
    (a dataset named ``..`` would make its unpack target ``resources/``, which a failed job's
    clean-up then deletes)."""
    import re

    for section in NAMED_SECTIONS:
        entries = config.get(section) or {}
        for name in entries if isinstance(entries, Mapping) else ():
            if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
                raise ConfigError(
                    f"{section}: the name {name!r} is not allowed: names become file and folder names and "
                    f"must match {NAME_PATTERN} (a letter or digit, then letters, digits, '.', '_', '+', '-')"
                )


def system_settings(config: Mapping, system: str, dataset: str | None = None) -> dict:
    """A system's encoder or scorer settings (what its dataclass holds), with the max lengths
    its ``lengths`` entry sets for ``dataset`` (the dataset whose texts a job encodes)."""
    entry = config["systems"][system]
    settings = entry_settings(f"systems.{entry['type']}", entry)
    settings.update((entry.get("lengths") or {}).get(dataset) or {})
    return settings


GPU_SECTIONS = ("systems", *TRAINING_SECTIONS)


def resolve_gpus(config: dict, usable_gpus: int) -> None:
    """Turn every ``gpus: auto`` into a count: 1 when this process may use a GPU
    (llmret.launch.usable_gpu_count), else 0. So the default config trains and encodes on a
    GPU box's GPUs with no edit (each job claims a free GPU, see llmret.launch) and nothing
    changes on a CPU machine. Under Slurm the submitting host's GPUs decide what a job asks
    for, and inside the job the GPUs Slurm gave it, so both sides agree; give counts to be
    sure."""
    auto = 1 if usable_gpus > 0 else 0
    for section in GPU_SECTIONS:
        for entry in (config.get(section) or {}).values():
            if (
                isinstance(entry, dict)
                and entry.get("gpus", "auto") == "auto"
                and (section != "systems" or entry.get("type") in ("dense", "sparse"))
            ):
                entry["gpus"] = auto


def prefill(config: dict) -> None:
    """Create the per-run objects whose defaults live in the schema's ``$defs`` (``lora``,
    ``training``): the validator fills defaults inside a referenced object, not the object.
    Names are checked first, so no later step sees an unsafe one. An optional table or
    check set to null (to switch off what a merged config file turned on) is removed."""
    check_names(config)
    for section in OPTIONAL_SECTIONS:
        if section in config and config[section] is None:
            del config[section]
    for section in TRAINING_SECTIONS:
        for run in (config.get(section) or {}).values():
            if isinstance(run, dict):
                run.setdefault("training", {})
                if section != "pretraining":
                    run.setdefault("lora", {})


def complete(config: dict) -> None:
    """Fill what the schema cannot: registry URLs, checksums and splits of BEIR datasets."""
    from llmret.data.registry import complete_dataset

    for name, ds in (config.get("datasets") or {}).items():
        config["datasets"][name] = complete_dataset(name, ds)


def check(config: Mapping) -> None:
    _check_metrics(config)
    datasets = config.get("datasets") or {}
    models = config.get("models") or {}
    systems = config.get("systems") or {}
    pretraining = config.get("pretraining") or {}
    finetuning = config.get("finetuning") or {}
    if not datasets:
        raise ConfigError("datasets: at least one dataset is needed")
    if not systems:
        raise ConfigError("systems: at least one system is needed")
    raw_files(config)  # one URL, one checksum
    _check_shared_corpora(datasets)
    for name, ds in datasets.items():
        if "files" in ds:
            if "url" in ds or "mirror_path" in ds or "zip_folder" in ds:
                raise ConfigError(f"datasets.{name}: set either files or url/mirror_path/zip_folder, not both")
            if ds.get("split") not in ds["files"]["splits"]:
                raise ConfigError(
                    f"datasets.{name}.split: {ds.get('split')!r} is not one of files.splits "
                    f"({sorted(ds['files']['splits'])})"
                )
            continue
        for key in ("url", "md5"):
            if not ds.get(key):
                raise ConfigError(f"datasets.{name}.{key}: not set, and {name!r} is not a known BEIR dataset")
    for name, sys_cfg in systems.items():
        kind = sys_cfg.get("type")
        if kind not in SYSTEM_TYPES:
            raise ConfigError(f"systems.{name}.type: must be one of {SYSTEM_TYPES}, got {kind!r}")
        if kind == "dense" and sys_cfg.get("model") not in {**models, **pretraining, **finetuning}:
            raise ConfigError(
                f"systems.{name}.model: {sys_cfg.get('model')!r} is not in models ({sorted(models)}), "
                f"pretraining ({sorted(pretraining)}) or finetuning ({sorted(finetuning)})"
            )
        if kind == "dense" and sys_cfg.get("model") in finetuning:
            run = sys_cfg["model"]
            for key in ENCODER_KEYS_FROM_TRAINING:
                if key in sys_cfg and key in finetuning[run] and sys_cfg[key] != finetuning[run][key]:
                    raise ConfigError(
                        f"systems.{name}.{key}: {sys_cfg[key]!r} differs from finetuning.{run}.{key} "
                        f"{finetuning[run][key]!r}; the model was trained to be used with the latter"
                    )
    _check_sparse_systems(config)
    _check_training_sections(config)
    _check_sparse_training(config)
    _check_flag_encoders(config)
    for run, run_cfg in pretraining.items():
        if run_cfg.get("model") not in models:
            raise ConfigError(f"pretraining.{run}.model: {run_cfg.get('model')!r} is not in models ({sorted(models)})")
        if not run_cfg.get("corpora") and "dpr_wiki" not in run_cfg:
            raise ConfigError(f"pretraining.{run}: no source of text; set corpora, dpr_wiki, or both")
        for d in run_cfg.get("corpora") or []:
            if d not in datasets:
                raise ConfigError(f"pretraining.{run}.corpora: {d!r} is not in datasets ({sorted(datasets)})")
    check_names(config)
    for name, system in systems.items():
        for d in system.get("lengths") or {}:
            if d not in datasets:
                raise ConfigError(f"systems.{name}.lengths: {d!r} is not in datasets ({sorted(datasets)})")
    table = config.get("table") or {}
    for d in table.get("datasets") or []:
        if d not in datasets:
            raise ConfigError(f"table.datasets: {d!r} is not in datasets ({sorted(datasets)})")
    for s in table.get("systems") or []:
        if s not in systems:
            raise ConfigError(f"table.systems: {s!r} is not in systems ({sorted(systems)})")
    baseline = (config.get("evaluation") or {}).get("baseline")
    if baseline and baseline not in table_systems(config):
        raise ConfigError(f"evaluation.baseline: {baseline!r} is not among the table's systems {table_systems(config)}")


def _check_metrics(config: Mapping) -> None:
    """Metric names are ranx's, checked here rather than after hours of encoding; the
    tables' metrics must be among those evaluated."""
    from llmret.results.evaluation import DEFAULT_METRICS, check_metric

    metrics = list((config.get("evaluation") or {}).get("metrics", DEFAULT_METRICS))
    for i, metric in enumerate(metrics):
        try:
            check_metric(metric)
        except ValueError as e:
            raise ConfigError(f"evaluation.metrics[{i}]: {e}") from None
    for section in ("table", "quantization_table"):
        metric = (config.get(section) or {}).get("metric")
        if metric is not None and metric not in metrics:
            raise ConfigError(f"{section}.metric: {metric!r} is not in evaluation.metrics {metrics}")


def _check_training_sections(config: Mapping) -> None:
    """Mining and fine-tuning name datasets, systems, models and runs: all must exist, and
    the checkpoint names of models, pretraining and fine-tuning runs must not collide."""
    datasets = config.get("datasets") or {}
    models = config.get("models") or {}
    systems = config.get("systems") or {}
    pretraining = config.get("pretraining") or {}
    mining = config.get("mining") or {}
    finetuning = config.get("finetuning") or {}
    for run in pretraining:
        if run in models:
            raise ConfigError(f"pretraining.{run}: a model has the same name; checkpoints would be ambiguous")
    for run in finetuning:
        if run in models or run in pretraining:
            raise ConfigError(f"finetuning.{run}: a model or pretraining run has the same name")
    for name, m in mining.items():
        if "file" in m:
            continue  # a released file: nothing to cross-check
        ds = m.get("dataset")
        if ds not in datasets:
            raise ConfigError(f"mining.{name}.dataset: {ds!r} is not in datasets ({sorted(datasets)})")
        if not datasets[ds].get("train"):
            raise ConfigError(f"mining.{name}.dataset: datasets.{ds} has no train split (add `train: {{}}`)")
        if m.get("retriever") not in systems:
            raise ConfigError(f"mining.{name}.retriever: {m.get('retriever')!r} is not in systems ({sorted(systems)})")
        lo, hi, depth = m.get("rank_from", 1), m.get("rank_to", 1), m.get("depth", 1)
        if not lo <= hi <= depth:
            raise ConfigError(f"mining.{name}: need rank_from <= rank_to <= depth, got {lo}, {hi}, {depth}")
    for run, r in finetuning.items():
        if r.get("model") not in {**models, **pretraining}:
            raise ConfigError(
                f"finetuning.{run}.model: {r.get('model')!r} is neither in models ({sorted(models)}) "
                f"nor in pretraining ({sorted(pretraining)})"
            )
        if r.get("negatives") not in mining:
            raise ConfigError(f"finetuning.{run}.negatives: {r.get('negatives')!r} is not in mining ({sorted(mining)})")
    msmarco = config.get("msmarco_table")
    if msmarco:
        for s in msmarco.get("systems") or []:
            if s not in systems:
                raise ConfigError(f"msmarco_table.systems: {s!r} is not in systems ({sorted(systems)})")
        metrics = (config.get("evaluation") or {}).get("metrics")
        for i, col in enumerate(msmarco["columns"]):
            if col["dataset"] not in datasets:
                raise ConfigError(f"msmarco_table.columns[{i}].dataset: {col['dataset']!r} is not in datasets")
            if metrics is not None and col["metric"] not in metrics:
                raise ConfigError(
                    f"msmarco_table.columns[{i}].metric: {col['metric']!r} is not in evaluation.metrics {metrics}"
                )


def _check_sparse_systems(config: Mapping) -> None:
    """A sparse system encodes with a causal LM (a base model, a pretraining, adaptation or
    CSPLADE run) and must frame and pool text as its CSPLADE run was trained to."""
    csplade = config.get("csplade") or {}
    known = {**(config.get("models") or {})}
    for section in ("pretraining", "adaptation", "csplade"):
        known.update(config.get(section) or {})
    tokenizers = {**known, **(config.get("finetuning") or {})}
    for name, sys_cfg in (config.get("systems") or {}).items():
        model = sys_cfg.get("model")
        if sys_cfg.get("type") == "bow" and model not in tokenizers:
            raise ConfigError(f"systems.{name}.model: {model!r} (whose tokenizer a bow system uses) is unknown")
        if sys_cfg.get("type") != "sparse":
            continue
        if model not in known:
            raise ConfigError(
                f"systems.{name}.model: {model!r} is not in models, pretraining, adaptation or csplade "
                f"({sorted(known)})"
            )
        if (config.get("models") or {}).get(model, {}).get("kind") == "encoder":
            raise ConfigError(f"systems.{name}.model: {model!r} is an encoder model; sparse systems need a causal LM")
        run = csplade.get(model)
        for key in SPARSE_KEYS_FROM_TRAINING if run else ():
            if key in sys_cfg and key in run and sys_cfg[key] != run[key]:
                raise ConfigError(
                    f"systems.{name}.{key}: {sys_cfg[key]!r} differs from csplade.{model}.{key} {run[key]!r}; "
                    "the model was trained to be used with the latter"
                )


def _check_sparse_training(config: Mapping) -> None:
    """Adaptation and CSPLADE runs name models, runs, datasets and mining specs: all must
    exist, and no two checkpoints may share a name."""
    datasets = config.get("datasets") or {}
    models = config.get("models") or {}
    mining = config.get("mining") or {}
    taken = {**models, **(config.get("pretraining") or {}), **(config.get("finetuning") or {})}
    for section in ("adaptation", "csplade"):
        for run in config.get(section) or {}:
            if run in taken:
                raise ConfigError(f"{section}.{run}: a model or another training run has the same name")
            taken[run] = True
    bases = {**models, **(config.get("pretraining") or {})}
    for run, r in (config.get("adaptation") or {}).items():
        if r.get("model") not in bases:
            raise ConfigError(f"adaptation.{run}.model: {r.get('model')!r} is not in models or pretraining")
        if r.get("corpus") not in datasets:
            raise ConfigError(f"adaptation.{run}.corpus: {r.get('corpus')!r} is not in datasets ({sorted(datasets)})")
    bases.update(config.get("adaptation") or {})
    for run, r in (config.get("csplade") or {}).items():
        if r.get("model") not in bases:
            raise ConfigError(
                f"csplade.{run}.model: {r.get('model')!r} is not in models, pretraining or adaptation ({sorted(bases)})"
            )
        if r.get("negatives") not in mining:
            raise ConfigError(f"csplade.{run}.negatives: {r.get('negatives')!r} is not in mining ({sorted(mining)})")
        adapted = (config.get("adaptation") or {}).get(r["model"])
        if adapted is not None and bool(r.get("bidirectional")) != bool(adapted.get("bidirectional")):
            # Attention the model never adapted to (or lost) breaks its vectors from step one.
            # echo is free: it changes the input (two copies), not the causal attention, and an
            # echo adaptation trains next-token loss on the first copy like a causal one.
            raise ConfigError(
                f"csplade.{run}.bidirectional: {bool(r.get('bidirectional'))} differs from adaptation."
                f"{r['model']}.bidirectional {bool(adapted.get('bidirectional'))}; adapt the model as it will train"
            )
    for run, section in ((r, s) for s in ("adaptation", "csplade") for r in config.get(s) or {}):
        model = config[section][run]["model"]
        if models.get(model, {}).get("kind") == "encoder":
            raise ConfigError(f"{section}.{run}.model: {model!r} is an encoder model; CSPLADE needs a causal LM")
    quant = config.get("quantization_table")
    if quant:
        for s in quant["systems"]:
            if s not in (config.get("systems") or {}):
                raise ConfigError(f"quantization_table.systems: {s!r} is not in systems")
            if config["systems"][s]["type"] == "bm25":
                raise ConfigError(f"quantization_table.systems: {s!r} is BM25; it has no encoder to quantize")
        ds = quant.get("dataset")
        if ds is not None and ds not in datasets:
            raise ConfigError(f"quantization_table.dataset: {ds!r} is not in datasets ({sorted(datasets)})")


def _check_flag_encoders(config: Mapping) -> None:
    """A dense system on a model pretrained with the FlagEmbedding LLaRA variant must feed
    and pool text as that run trained (summary tokens in the templates, no EOS, mean of the
    last K states): the schema's defaults (last token, ``{text}``) would silently not."""
    runs = {r: c for r, c in (config.get("pretraining") or {}).items() if c.get("variant") == "flagembedding"}
    if not runs:
        return
    from dataclasses import fields

    from llmret.llara.objective import encoder_settings
    from llmret.llara.pretraining import PretrainSpec

    names = {f.name for f in fields(PretrainSpec)}
    for name, sys_cfg in (config.get("systems") or {}).items():
        run = sys_cfg.get("model")
        if sys_cfg.get("type") != "dense" or run not in runs:
            continue
        spec = PretrainSpec.from_config({k: v for k, v in runs[run].items() if k in names})
        for key, want in encoder_settings(spec.objective()).items():
            if sys_cfg.get(key) != want:
                raise ConfigError(
                    f"systems.{name}.{key}: {sys_cfg.get(key)!r}, but pretraining.{run} (variant flagembedding) "
                    f"trained the model for {want!r}"
                )


def training_runs(config: Mapping) -> list[dict]:
    """The ``training`` sections of every training run (pretraining, fine-tuning, adaptation, CSPLADE)."""
    runs = [r for section in TRAINING_SECTIONS for r in (config.get(section) or {}).values()]
    return [r["training"] for r in runs if "training" in r]


def resolve_paths(config: dict, basedir: str) -> None:
    """Relative file settings that do not exist from the working directory (a run with
    ``--directory``) are taken relative to the workflow (``config/deepspeed/cpu.json``)."""
    for training in training_runs(config):
        path = training["deepspeed_config"]
        if not os.path.isabs(path) and not os.path.exists(path):
            training["deepspeed_config"] = os.path.join(basedir, path)
    expected = config.get("expected")
    if expected and not os.path.isabs(expected["file"]) and not os.path.exists(expected["file"]):
        expected["file"] = os.path.join(basedir, expected["file"])


def expected_cells(config: Mapping) -> list:
    """The expected-scores cells of ``expected.file`` (none when unset), each naming a
    configured system and dataset and an evaluated metric (errors give file:line)."""
    from llmret.results import expected

    spec = config.get("expected")
    if not spec:
        return []
    try:
        cells = expected.load(spec["file"])
        expected.check_names(
            cells, config["systems"], config["datasets"], config["evaluation"]["metrics"], spec["file"]
        )
    except expected.ExpectedError as e:
        raise ConfigError(f"expected.file: {e}") from e
    return cells


def _corpus_source(ds: Mapping) -> tuple:
    if "files" in ds:
        c = ds["files"]["corpus"]
        return (c["url"], c["md5"].lower(), c.get("member"))
    md5 = ds.get("md5")
    return (ds.get("url"), tuple(sorted([md5] if isinstance(md5, str) else md5 or [])))


def _check_shared_corpora(datasets: Mapping) -> None:
    """corpus_from is safe only when both corpora are the same documents: the same
    download, and no document subsampling on either side."""
    for name, ds in datasets.items():
        src = ds.get("corpus_from")
        if not src:
            continue
        where = f"datasets.{name}.corpus_from"
        if src == name or src not in datasets:
            raise ConfigError(f"{where}: {src!r} must be another dataset ({sorted(set(datasets) - {name})})")
        if datasets[src].get("corpus_from"):
            raise ConfigError(f"{where}: {src!r} takes its corpus from {datasets[src]['corpus_from']!r}: name that")
        for d in (name, src):
            if (datasets[d].get("subsample") or {}).get("max_docs"):
                raise ConfigError(f"{where}: datasets.{d}.subsample.max_docs would make the two corpora differ")
        if _corpus_source(ds) != _corpus_source(datasets[src]):
            raise ConfigError(f"{where}: {name!r} and {src!r} do not download the same corpus")


def runs_used(config: Mapping, systems: Iterable[str]) -> list[str]:
    """Training runs (in config order: pretraining, fine-tuning, adaptation, CSPLADE) that the
    given systems' models come from, directly or through a run's base: what `all` plots."""
    runs = {r: c for section in TRAINING_SECTIONS for r, c in (config.get(section) or {}).items()}
    used: set[str] = set()
    stack = [config["systems"][s].get("model") for s in systems]
    while stack:
        name = stack.pop()
        if name in used or name not in runs:
            continue
        used.add(name)
        stack.append(runs[name]["model"])
    return [r for r in runs if r in used]


def run_stages(config: Mapping, runs: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(run, section, base model)`` of each named training run, in config order: the rows
    of the training table."""
    wanted = set(runs)
    return [
        (r, section, c["model"])
        for section in TRAINING_SECTIONS
        for r, c in (config.get(section) or {}).items()
        if r in wanted
    ]


def corpus_shards(config: Mapping, dataset: str) -> list[str]:
    """Names of a dataset's corpus shards, planned from its ``corpus_size`` (or subsample
    ``max_docs``) over ``encoding.shard_size``; one shard when the size is unknown."""
    from llmret.retrieval.corpus_shards import shard_count, shard_names
    from llmret.sizing import planned_corpus_size

    size = planned_corpus_size(config["datasets"][dataset])
    return shard_names(shard_count(size, config["encoding"]["shard_size"]))


def table_systems(config: Mapping) -> list[str]:
    return list((config.get("table") or {}).get("systems") or config["systems"])


def table_datasets(config: Mapping) -> list[str]:
    return list((config.get("table") or {}).get("datasets") or config["datasets"])


def systems_of_type(config: Mapping, kind: str) -> list[str]:
    return [s for s, c in config["systems"].items() if c["type"] == kind]


def prepare_environment(src_dir: str, cache_dir: str = ".cache") -> None:
    """Environment every job inherits: the library importable from ``src_dir`` (jobs are
    separate processes, maybe in a conda env, and the package need not be installed) and
    a persistent numba cache (ranx compiles its metrics; cached, that is ~15 s less per job).
    """
    paths = [src_dir] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != src_dir]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.abspath(os.path.join(cache_dir, "numba")))
