"""The config schema (``config.schema.yaml``, shipped in this package) as the one place a
setting is declared: its default, bounds, choices and description.

The workflow validates its config against the file (Snakemake's ``validate`` fills the
defaults); the settings dataclasses take their defaults from it (:func:`default`) and refuse
what it refuses (:func:`check_bounds`), so the library used without the workflow keeps the
same rules; ``python -m llmret.settings_doc`` writes config/README.md's tables from it.

An *entry* names an object of the schema: a section's entry (``finetuning``: one run;
``models``: one model), a system type (``systems.dense``), a shared block (``lora``,
``training``) or an object inside one (``systems.dense.index``, ``datasets.train``), the
names of :data:`llmret.plan.SPEC_CLASSES`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

PATH = Path(__file__).with_name("config.schema.yaml")
# Blocks defined once under $defs and referenced by every training run.
SHARED_BLOCKS = ("lora", "training")
REF_PREFIX = "#/$defs/"


@functools.cache
def load() -> dict:
    """The schema as a mapping (read once; never mutate it)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(PATH.read_text(encoding="utf-8"), Loader=loader)


def resolve(node: Mapping) -> dict:
    """``node`` with its ``$ref`` replaced by the definition it names; the node's own keys win
    (``gpus: {$ref: ..., default: auto}``)."""
    defs = load()["$defs"]
    node = dict(node)
    while "$ref" in node:
        ref = node.pop("$ref")
        if not ref.startswith(REF_PREFIX):
            raise ValueError(f"unsupported $ref {ref!r}: only {REF_PREFIX}NAME")
        node = {**defs[ref.removeprefix(REF_PREFIX)], **node}
    return node


@functools.cache
def _entry_node(entry: str) -> dict:
    schema = load()
    first, *rest = entry.split(".")
    if first in SHARED_BLOCKS:
        node = schema["$defs"][first]
    elif first == "systems" and rest:
        kind, *rest = rest
        branches = [
            b["then"]
            for b in schema["properties"]["systems"]["additionalProperties"]["allOf"]
            if b["if"]["properties"]["type"]["const"] == kind
        ]
        if not branches:
            raise KeyError(f"no system type {kind!r} in the config schema")
        node = branches[0]
    elif first in schema["properties"]:
        node = resolve(schema["properties"][first])
        named = node.get("additionalProperties")
        if "properties" not in node and isinstance(named, Mapping):
            node = named  # a section of named entries: the schema of one entry
    else:
        raise KeyError(f"no entry {entry!r} in the config schema")
    for key in rest:
        node = resolve(node.get("properties", {}).get(key) or {})
    if "properties" not in node:
        raise KeyError(f"{entry!r} is not an object with properties in the config schema")
    return node


def entry_node(entry: str) -> dict:
    """The object schema of ``entry`` (its ``properties``, ``required``, ``description``)."""
    return _entry_node(entry)


@functools.cache
def _properties(entry: str) -> dict[str, dict]:
    return {key: resolve(prop) for key, prop in _entry_node(entry)["properties"].items()}


def properties(entry: str) -> dict[str, dict]:
    """Key -> the schema of that setting (``$ref`` resolved), in the schema's order."""
    return dict(_properties(entry))


def default(entry: str, key: str) -> Any:
    """The schema's default of ``entry.key`` (a fresh copy: lists are never shared)."""
    prop = _properties(entry).get(key)
    if prop is None or "default" not in prop:
        raise KeyError(f"the config schema declares no default for {entry}.{key}")
    return copy.deepcopy(prop["default"])


def defaults_from(entry: str):
    """Class decorator, placed under ``@dataclass``: every field the class annotates without a
    default, and every field it inherits without one, takes the schema's default for
    ``entry`` (a list or dict through a factory, so instances never share one). The schema
    stays the one place a default is written; a shared base (``TextFraming``) declares its
    fields once and each subclass gets its own entry's defaults."""

    def apply(cls: type) -> type:
        props = _properties(entry)
        own = cls.__dict__.get("__annotations__")
        if own is None:
            own = {}
            cls.__annotations__ = own
        for base in cls.__mro__[1:]:
            for f in getattr(base, "__dataclass_fields__", {}).values():
                if f.name not in own and f.default is dataclasses.MISSING and "default" in props.get(f.name, {}):
                    own[f.name] = f.type
        for name in own:
            if name in cls.__dict__ or "default" not in props.get(name, {}):
                continue
            value = props[name]["default"]
            if isinstance(value, list | dict):
                setattr(cls, name, dataclasses.field(default_factory=lambda v=value: copy.deepcopy(v)))
            else:
                setattr(cls, name, value)
        return cls

    return apply


# --------------------------------------------------------------------------- bounds


def types_of(prop: Mapping) -> tuple[str, ...]:
    """The JSON types a property allows (``type`` as a tuple; empty when it has none)."""
    declared = prop.get("type", ())
    return (declared,) if isinstance(declared, str) else tuple(declared)


def nullable(prop: Mapping) -> bool:
    return "null" in types_of(prop) or None in prop.get("enum", ())


def limits(prop: Mapping) -> str:
    """The numeric bounds in words: ``>= 1``, ``> 0``, ``in (0, 1]``; "" when none."""
    low = next(((b, prop[k]) for k, b in (("minimum", "["), ("exclusiveMinimum", "(")) if k in prop), None)
    high = next(((b, prop[k]) for k, b in (("maximum", "]"), ("exclusiveMaximum", ")")) if k in prop), None)
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


_TYPE_WORDS = {"integer": "an integer", "number": "a number", "boolean": "true or false"}


def requirement(prop: Mapping) -> str:
    """What a value must be, as :func:`check_bounds` words it (``an integer >= 1``, ``a number
    in (0, 1] or null``, ``one of ['spread', 'best']``); "" when the schema bounds nothing
    that :func:`check_bounds` checks."""
    if "enum" in prop:
        return f"one of {list(prop['enum'])}"
    kind = next((t for t in types_of(prop) if t in _TYPE_WORDS), None)
    words = " ".join(w for w in (_TYPE_WORDS.get(kind, ""), limits(prop)) if w)
    if "minItems" in prop:
        n = prop["minItems"]
        words = f"a list of at least {n} item{'' if n == 1 else 's'}"
    if words and nullable(prop):
        words += " or null"
    return words


def _is_type(kind: str, value: object) -> bool:
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    if kind == "integer":
        return isinstance(value, numbers.Integral)
    return not math.isnan(value)  # number: NaN compares false with every bound


def _within(prop: Mapping, value: float) -> bool:
    return (
        value >= prop.get("minimum", -math.inf)
        and value > prop.get("exclusiveMinimum", -math.inf)
        and value <= prop.get("maximum", math.inf)
        and value < prop.get("exclusiveMaximum", math.inf)
    )


def satisfies(prop: Mapping, value: object) -> bool:
    """Whether ``value`` meets the property's type (integer, number, boolean), numeric bounds,
    ``enum`` and ``minItems``; other keywords (patterns, strings) are left to the caller."""
    if value is None and nullable(prop):
        return True
    if "enum" in prop:
        return any(value == choice and isinstance(value, bool) == isinstance(choice, bool) for choice in prop["enum"])
    kind = next((t for t in types_of(prop) if t in _TYPE_WORDS), None)
    if kind is not None and not _is_type(kind, value):
        return False
    if kind in ("integer", "number") and not _within(prop, value):
        return False
    if "minItems" in prop:
        try:
            return len(value) >= prop["minItems"]
        except TypeError:
            return False
    return True


def check_bounds(obj: object, entry: str, prefix: str = "") -> None:
    """``ValueError`` naming the first field of the dataclass instance ``obj`` whose value the
    schema of ``entry`` refuses (type, ``minimum``, ``exclusiveMinimum``, ``maximum``,
    ``exclusiveMaximum``, ``enum``, ``minItems``), e.g. ``r must be an integer >= 1, got 0``;
    ``prefix`` starts the message (``"lora "``). Fields the schema does not list are the
    caller's to check."""
    props = _properties(entry)
    for f in fields(obj):
        prop = props.get(f.name)
        if prop is None:
            continue
        value = getattr(obj, f.name)
        if not satisfies(prop, value):
            raise ValueError(f"{prefix}{f.name} must be {requirement(prop)}, got {value!r}")
