"""Settings dataclasses built from config mappings, with clear errors: :class:`ConfigError`,
:func:`settings` (an unknown key is an error, never a silent default), bound and choice
checks, and the part of a config entry that a spec holds (the rest is workflow wiring).

The config sections: config/README.md.
"""

from __future__ import annotations

from collections.abc import Mapping
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
