"""What the workflow derives from a validated config: the settings each job carries (its
rerun keys), the training runs behind a set of systems, corpus shards, the tables' rows and
columns, GPU counts and paths resolved. The checks are in :mod:`llmret.checks`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from llmret import registry
from llmret.specs import own_settings, rerun_keys

# Sections that turn on an output or a check; null switches one off.
OPTIONAL_SECTIONS = ("expected", "msmarco_table", "quantization_table")


# The dataclass behind each config entry that is not a training stage (those are in
# llmret.registry): the schema's keys for it are its fields plus the workflow's wiring
# (tests/test_schema_specs.py checks keys, defaults and bounds agree).
OTHER_SPEC_CLASSES = {
    "systems.dense.index": "llmret.retrieval.faiss_index:IndexSpec",
    "systems.sparse.sparse_index": "llmret.retrieval.sparse_index:SparseIndexSpec",
    "models": "llmret.retrieval.model_import:ModelSource",
    "mining": "llmret.training.mining:MiningSpec",
    "encoding": "llmret.retrieval.corpus_shards:EncodingSpec",
    "lora": "llmret.training.lora:LoraSpec",
    "training": "llmret.training.arguments:TrainingArgs",
}


def spec_classes() -> dict[str, str]:
    """Every config entry with a dataclass behind it: ``{entry: "module:Class"}``."""
    return {
        **{f"systems.{t.name}": t.spec for t in registry.SYSTEM_TYPES.values()},
        **OTHER_SPEC_CLASSES,
        **{s.section: s.spec for s in registry.STAGES.values()},
    }


SPEC_CLASSES = spec_classes()


def spec_class(entry: str) -> type:
    """The dataclass of a config entry (a key of :func:`spec_classes`), imported on demand."""
    return registry.load(spec_classes()[entry])


def entry_settings(entry: str, mapping: Mapping) -> dict:
    """The settings of a config entry that its dataclass holds (what a job's params carry)."""
    return own_settings(spec_class(entry), mapping)


def rerun_settings(entry: str, mapping: Mapping) -> dict:
    """The settings of a config entry that its jobs' ``params`` carry (:func:`llmret.specs.rerun_keys`):
    what its dataclass holds, or the values it resolves where it says (``rerun_keys``), so
    writing a default out never reruns a job."""
    return rerun_keys(spec_class(entry), entry_settings(entry, mapping))


def entry_tokenization(entry: str, mapping: Mapping) -> str:
    """:func:`llmret.retrieval.tokenization.tokenization_of` for a config entry (its dataclass
    with the schema's defaults filled in)."""
    from llmret.retrieval.tokenization import tokenization_of

    return tokenization_of(spec_class(entry)(**entry_settings(entry, mapping)))


def system_settings(config: Mapping, system: str, dataset: str | None = None) -> dict:
    """A system's encoder or scorer settings (what its dataclass holds), with the max lengths
    its ``lengths`` entry sets for ``dataset`` (the dataset whose texts a job encodes)."""
    entry = config["systems"][system]
    settings = entry_settings(f"systems.{entry['type']}", entry)
    settings.update((entry.get("lengths") or {}).get(dataset) or {})
    return settings


def resolve_gpus(config: dict, usable_gpus: int) -> list[str]:
    """Turn every ``gpus: auto`` into a count and return the settings it resolved
    (``systems.<name>.gpus``, ``<section>.<run>.gpus``).

    ``auto`` is the top-level ``gpus_auto`` when set (profiles/slurm sets 1: a login node
    sees none of the compute nodes' GPUs, so the count cannot come from it), else 1 when this
    process may use a GPU (``usable_gpus``, llmret.launch.usable_gpu_count) and 0 when it
    may not. So the default config trains and encodes on a GPU box's GPUs with no edit (each
    job claims a free GPU, see llmret.launch), nothing changes on a CPU machine, and under
    the Slurm profile every GPU job asks for one GPU; inside a Slurm job the GPUs Slurm gave
    it. Paper presets give explicit counts."""
    fixed = config.get("gpus_auto")
    auto = fixed if fixed is not None else (1 if usable_gpus > 0 else 0)
    resolved = []
    for section in ("systems", *registry.sections()):
        for name, entry in (config.get(section) or {}).items():
            if (
                isinstance(entry, dict)
                and entry.get("gpus", "auto") == "auto"
                and (section != "systems" or registry.system_type(entry.get("type")).encoder)
            ):
                entry["gpus"] = auto
                resolved.append(f"{section}.{name}.gpus")
    return resolved


def resolve_training(config: dict) -> None:
    """Per training run, what its resolved ``gpus`` decide (call after :func:`resolve_gpus`):
    ``training.deepspeed_config: auto`` becomes the GPU or CPU DeepSpeed file
    (llmret.training.job_settings.deepspeed_config_for, the one place of that choice), and a
    ``training.global_batch_size`` must equal per-device batch x ranks x accumulation, so a
    preset run on fewer GPUs fails here, before any job is queued, not at its start."""
    from llmret.training.job_settings import check_global_batch, deepspeed_config_for

    for run, stage, entry in registry.runs(config):
        training = entry.get("training")
        if not isinstance(training, dict):
            continue
        gpus = entry.get("gpus", 0)
        if isinstance(gpus, bool) or not isinstance(gpus, int):
            raise ValueError(f"{stage.section}.{run}.gpus is {gpus!r}: resolve_gpus first")
        if training.get("deepspeed_config") == "auto":
            training["deepspeed_config"] = deepspeed_config_for("auto", gpus)
        check_global_batch(
            training.get("global_batch_size"),
            training.get("per_device_batch_size", 1),
            training.get("gradient_accumulation_steps", 1),
            gpus,
            where=f"{stage.section}.{run}.training",
        )


def complete(config: dict) -> None:
    """Fill what the schema cannot: registry URLs, checksums and splits of BEIR datasets."""
    from llmret.data.known_datasets import complete_dataset

    for name, ds in (config.get("datasets") or {}).items():
        config["datasets"][name] = complete_dataset(name, ds)


def training_runs(config: Mapping) -> list[dict]:
    """The ``training`` sections of every training run (pretraining, fine-tuning, adaptation, CSPLADE)."""
    return [r["training"] for _, _, r in registry.runs(config) if "training" in r]


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


def runs_used(config: Mapping, systems: Iterable[str]) -> list[str]:
    """Training runs (in config order: pretraining, fine-tuning, adaptation, CSPLADE) that the
    given systems' models come from, directly or through a run's base: what `all` plots."""
    runs = {r: c for r, _, c in registry.runs(config)}
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
    return [(r, stage.section, c["model"]) for r, stage, c in registry.runs(config) if r in wanted]


def corpus_shards(config: Mapping, dataset: str) -> list[str]:
    """Names of a dataset's corpus shards, planned from its ``corpus_size`` (or subsample
    ``max_docs``) over ``encoding.shard_size``; one shard when the size is unknown."""
    from llmret.retrieval.corpus_shards import EncodingSpec, shard_count, shard_names
    from llmret.sizing import planned_corpus_size

    size = planned_corpus_size(config["datasets"][dataset])
    return shard_names(shard_count(size, EncodingSpec.from_config(config).shard_size))


def table_systems(config: Mapping) -> list[str]:
    return list((config.get("table") or {}).get("systems") or config["systems"])


def table_datasets(config: Mapping) -> list[str]:
    return list((config.get("table") or {}).get("datasets") or config["datasets"])


def systems_of_type(config: Mapping, kind: str) -> list[str]:
    return [s for s, c in config["systems"].items() if c["type"] == kind]
