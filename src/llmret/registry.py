"""The training stages and the system types, each declared once.

A stage: its config section, its settings dataclass, its entry point, the checkpoints it
may start from, the file it reads, and which system types may encode with what it trains.
A system type: its settings dataclass and the family of workflow rules that builds its runs.

Everything that lists stages or system types is derived from :data:`STAGES` and
:data:`SYSTEM_TYPES`: the tasks :mod:`llmret.launch` may run, the config's cross-checks
(``llmret.checks``), the workflow's plan (``llmret.plan``), memory sizing
(:mod:`llmret.sizing`), the workflow's one generic training rule
(``workflow/rules/training.smk``) and the schema/dataclass agreement test. Adding a stage:
docs/extending.md. Code is named by ``"module:attribute"`` strings and imported on demand, so
this module stays at the bottom of the package (it imports nothing of llmret).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# Where a run's base model may come from besides other stages' runs.
MODELS = "models"


@dataclass(frozen=True)
class DataSource:
    """The file a stage's run trains on.

    ``key`` is the run's setting naming it (None: the file belongs to the run itself),
    ``section`` the config section that names must exist in, ``path`` the workflow's file
    (``{name}`` the key's value, ``{run}`` the run), ``argument`` the entry point's keyword.
    """

    argument: str
    path: str
    key: str | None = None
    section: str | None = None
    many: bool = False  # the key holds a list of names
    required: bool = True


@dataclass(frozen=True)
class Stage:
    """One training stage (a config section of named runs, one job per run).

    ``bases``: sections whose runs a run's ``model`` may name (``models`` always may).
    ``serves``: system types that may encode with a run's checkpoint (``bow`` systems may
    use any run's tokenizer). ``shared_keys``: for a system type, settings it must keep equal
    to the run's, since the model was trained to be used with them. ``causal_only``: refuse
    an encoder (MiniLM-like) base. ``lora``: the run trains a LoRA adapter (a ``lora`` block;
    an adapter folder beside the merged model). ``wiring``: the run's config keys that are the
    workflow's, not settings of ``spec`` (beyond ``model``, ``gpus``, ``training``, ``lora``
    and the data key). ``rule``: the workflow rule that trains the runs: the generic
    ``train``, or a named copy of it (``use rule train as ...``) with its own logs and
    cluster resources. ``required_system_settings``: for a system type, ``"module:function"``
    giving, from a run's config entry, the settings such a system on its model must have.
    """

    section: str
    spec: str
    entry: str
    data: DataSource
    bases: tuple[str, ...] = ()
    serves: tuple[str, ...] = ()
    shared_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    causal_only: bool = False
    lora: bool = True
    wiring: tuple[str, ...] = ()
    rule: str = "train"
    required_system_settings: Mapping[str, str] = field(default_factory=dict)
    title: str = ""

    def spec_class(self) -> type:
        return load(self.spec)

    def entry_point(self):
        return load(self.entry)

    def config_keys(self) -> set[str]:
        """The run's keys that are wiring: everything in its config entry but its settings."""
        keys = {"model", "gpus", "training", *self.wiring}
        if self.lora:
            keys.add("lora")
        if self.data.key:
            keys.add(self.data.key)
        return keys

    def data_names(self, run: Mapping) -> list[str]:
        """The names a run's data key gives (none when the file is the run's own)."""
        if not self.data.key:
            return []
        value = run.get(self.data.key)
        if value is None:
            return []
        return list(value) if self.data.many else [value]

    def data_path(self, run_name: str, run: Mapping) -> str:
        """The workflow file this run trains on."""
        names = self.data_names(run)
        return self.data.path.format(run=run_name, name=names[0] if names else "")

    def call_arguments(self, *, data: str, out_dir: str, adapter_dir: str | None, **common: Any) -> dict:
        """Keyword arguments of the entry point: the shared ones, the data file under the
        stage's own keyword, and the adapter folder for LoRA stages."""
        kwargs = {**common, self.data.argument: data, "out_dir": out_dir}
        if self.lora:
            kwargs["adapter_dir"] = adapter_dir
        else:
            kwargs.pop("lora", None)
        return kwargs


def load(target: str):
    """Import ``"module:attribute"``."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


SHARED_DENSE_KEYS = ("query_template", "passage_template", "append_eos", "pooling", "normalize")
SHARED_SPARSE_KEYS = ("query_template", "passage_template", "append_eos", "echo", "bidirectional")

STAGES: dict[str, Stage] = {
    s.section: s
    for s in (
        Stage(
            section="pretraining",
            rule="llara_pretrain",
            title="LLaRA pretraining (EBAE/EBAR) of a causal LM",
            spec="llmret.llara.pretraining:PretrainSpec",
            entry="llmret.llara.pretraining:pretrain",
            data=DataSource(
                argument="manifest",
                path="results/shards/{run}/manifest.json",
                key="corpora",
                section="datasets",
                many=True,
                required=False,
            ),
            bases=(),
            serves=("dense", "sparse"),
            required_system_settings={"dense": "llmret.llara.pretraining:required_encoder_settings"},
            lora=False,
            wiring=("dpr_wiki",),
        ),
        Stage(
            section="finetuning",
            rule="finetune",
            title="RepLLaMA-style LoRA contrastive fine-tuning",
            spec="llmret.finetuning.repllama:FinetuningSpec",
            entry="llmret.finetuning.repllama:finetune",
            data=DataSource(
                argument="negatives_path",
                path="results/mining/{name}/negatives.jsonl",
                key="negatives",
                section="mining",
            ),
            bases=("pretraining",),
            serves=("dense",),
            shared_keys={"dense": SHARED_DENSE_KEYS},
        ),
        Stage(
            section="adaptation",
            rule="csplade_adapt",
            title="CSPLADE's adaptation phase on a corpus",
            spec="llmret.csplade.adaptation:AdaptationSpec",
            entry="llmret.csplade.adaptation:adapt",
            data=DataSource(
                argument="corpus_path",
                path="results/data/{name}/corpus.jsonl",
                key="corpus",
                section="datasets",
            ),
            bases=("pretraining",),
            serves=("sparse",),
            causal_only=True,
        ),
        Stage(
            section="csplade",
            rule="csplade_train",
            title="CSPLADE contrastive + FLOPS LoRA training",
            spec="llmret.csplade.sparse_training:CspladeSpec",
            entry="llmret.csplade.sparse_training:train",
            data=DataSource(
                argument="negatives_path",
                path="results/mining/{name}/negatives.jsonl",
                key="negatives",
                section="mining",
            ),
            bases=("pretraining", "adaptation"),
            serves=("sparse",),
            shared_keys={"sparse": SHARED_SPARSE_KEYS},
            causal_only=True,
        ),
    )
}


@dataclass(frozen=True)
class SystemType:
    """A ``systems.<name>.type``.

    ``family``: the workflow rules that encode, index and search it: ``bm25`` (a Lucene-like
    index of the text), ``dense`` (vectors and FAISS, dense.smk) or ``sparse`` (term weights
    and an inverted index, sparse.smk). ``encoder``: it runs a model's network (it may use
    GPUs; ``gpus: auto`` is resolved for it). ``model``: it names a model. ``any_run``: it may name any training run's
    checkpoint (it reads only the tokenizer); otherwise only base models and runs of stages
    that serve it (:attr:`Stage.serves`).
    """

    name: str
    spec: str
    family: str
    model: bool = True
    encoder: bool = False
    any_run: bool = False


SYSTEM_TYPES: dict[str, SystemType] = {
    t.name: t
    for t in (
        SystemType("bm25", spec="llmret.retrieval.bm25:BM25Params", family="bm25", model=False),
        SystemType("dense", spec="llmret.retrieval.encoder:EncoderSpec", family="dense", encoder=True),
        SystemType("sparse", spec="llmret.retrieval.sparse_encoder:SparseEncoderSpec", family="sparse", encoder=True),
        # bag of words over a model's tokenizer: no network, searched as a sparse system
        SystemType("bow", spec="llmret.retrieval.bow:BowSpec", family="sparse", any_run=True),
    )
}


def system_type(name: str) -> SystemType:
    if name not in SYSTEM_TYPES:
        raise ValueError(f"unknown system type {name!r}; known: {sorted(SYSTEM_TYPES)}")
    return SYSTEM_TYPES[name]


def systems_of_family(config: Mapping, family: str) -> list[str]:
    """The configured systems whose type is built by ``family``'s rules, in config order."""
    return [s for s, c in (config.get("systems") or {}).items() if SYSTEM_TYPES[c["type"]].family == family]


def sections() -> tuple[str, ...]:
    """The training sections, in registry order (the order of the training table)."""
    return tuple(STAGES)


def stage(section: str) -> Stage:
    if section not in STAGES:
        raise ValueError(f"unknown training stage {section!r}; known: {sorted(STAGES)}")
    return STAGES[section]


def runs(config: Mapping) -> Iterator[tuple[str, Stage, Mapping]]:
    """``(run name, stage, run entry)`` of every training run in the config, stage by stage."""
    for s in STAGES.values():
        for name, run in (config.get(s.section) or {}).items():
            yield name, s, run


def stage_of(config: Mapping, run: str) -> Stage:
    """The stage a run belongs to (run names are unique across stages and models)."""
    for name, s, _ in runs(config):
        if name == run:
            return s
    raise KeyError(f"{run!r} is not a training run of any stage ({sorted(STAGES)})")


def run_entry(config: Mapping, run: str) -> Mapping:
    return config[stage_of(config, run).section][run]


def register(new: Stage) -> None:
    """Add a stage (a plug-in, or a test's toy stage); its section must be new."""
    if new.section in STAGES or new.section == MODELS:
        raise ValueError(f"a stage or section named {new.section!r} exists")
    STAGES[new.section] = new
