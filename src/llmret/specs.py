"""Settings dataclasses built from config mappings, with clear errors: :class:`ConfigError`,
:func:`settings` (an unknown key is an error, never a silent default), bound and choice
checks, and the part of a config entry that a spec holds (the rest is workflow wiring).

The config sections: config/README.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting is wrong; the message names it as ``section.key``."""


def settings(cls: type[T], mapping: Mapping, what: str) -> T:
    """Build a settings dataclass from a config mapping; an unknown key is an error naming
    ``what`` (a typo must not silently fall back to a default)."""
    unknown = set(mapping) - field_names(cls)
    if unknown:
        raise ValueError(f"unknown {what}: {sorted(unknown)}")
    return cls(**dict(mapping))


def check_at_least(obj: object, bound: float, *names: str) -> None:
    """``ValueError`` naming the first of ``names`` whose value is below ``bound``."""
    for name in names:
        value = getattr(obj, name)
        if value < bound:
            raise ValueError(f"{name} must be >= {bound}, got {value}")


def check_choice(obj: object, choices: tuple, *names: str) -> None:
    """``ValueError`` naming the first of ``names`` whose value is not one of ``choices``."""
    for name in names:
        value = getattr(obj, name)
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def field_names(cls: type) -> frozenset[str]:
    """The settings a dataclass holds."""
    return frozenset(f.name for f in fields(cls))


def own_settings(cls: type, mapping: Mapping) -> dict:
    """The part of a config entry that ``cls`` holds, in the entry's order: the rest (base
    model, data, GPUs, nested sections) is the workflow's wiring. The dataclass is the one
    list of which keys are settings, so the workflow keeps no skip-lists of its own."""
    names = field_names(cls)
    return {k: v for k, v in mapping.items() if k in names}


def rerun_keys(spec_class: type, values: Mapping) -> dict:
    """The rerun keys of a config entry: the settings its jobs' outputs depend on, as the
    workflow passes them in ``params`` (Snakemake reruns a job whose params changed, comparing
    their printed form, so key order and value types count). ``spec_class`` is the entry's
    settings dataclass, ``values`` the part of the entry it holds (schema defaults filled).

    A spec class may define ``rerun_keys(self) -> dict`` (e.g. :class:`llmret.llara.pretraining.
    PretrainSpec`: defaults resolved per variant, fewer keys for runs from before a setting
    existed); then the spec is built from ``values`` and its keys come in ``values``' order
    first (:func:`in_order`). Otherwise the keys are ``values`` as given, not built (the
    spec's fields the entry leaves out, or values its ``__post_init__`` would normalise, are
    no rerun keys). The tokenisation tag (:func:`llmret.retrieval.tokenization.tokenization_of`)
    is the other rerun key of a text-framing job, a param of its own.
    """
    if getattr(spec_class, "rerun_keys", None) is None:
        return dict(values)
    return in_order(settings(spec_class, values, f"{spec_class.__name__} settings").rerun_keys(), values)


def in_order(values: Mapping, order: Iterable[str]) -> dict:
    """``values`` with the keys named in ``order`` first, in that order, then the rest in theirs."""
    first = [k for k in dict.fromkeys(order) if k in values]
    return {k: values[k] for k in [*first, *(k for k in values if k not in first)]}
