"""Cross-checks of the workflow config that a JSON schema cannot express.

The schema (``workflow/schemas/config.schema.yaml``) checks shapes and fills defaults;
this module checks references between sections (a system naming an unknown model, a
table naming an unknown dataset) so a typo stops before any job runs, with the setting
named.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from typing import TypeVar

T = TypeVar("T")

MIRROR_ENV = "LLMRET_MIRROR"
SYSTEM_TYPES = ("bm25", "dense")


class ConfigError(ValueError):
    """A setting is wrong; the message names it as ``section.key``."""


def complete(config: dict) -> None:
    """Fill what the schema cannot: registry URLs, checksums and splits of BEIR datasets."""
    from .registry import complete_dataset

    for name, ds in (config.get("datasets") or {}).items():
        config["datasets"][name] = complete_dataset(name, ds)


def check(config: Mapping) -> None:
    datasets = config.get("datasets") or {}
    models = config.get("models") or {}
    systems = config.get("systems") or {}
    pretraining = config.get("pretraining") or {}
    if not datasets:
        raise ConfigError("datasets: at least one dataset is needed")
    if not systems:
        raise ConfigError("systems: at least one system is needed")
    for name, ds in datasets.items():
        for key in ("url", "md5"):
            if not ds.get(key):
                raise ConfigError(f"datasets.{name}.{key}: not set, and {name!r} is not a known BEIR dataset")
    for name, sys_cfg in systems.items():
        kind = sys_cfg.get("type")
        if kind not in SYSTEM_TYPES:
            raise ConfigError(f"systems.{name}.type: must be one of {SYSTEM_TYPES}, got {kind!r}")
        if kind == "dense" and sys_cfg.get("model") not in {**models, **pretraining}:
            raise ConfigError(
                f"systems.{name}.model: {sys_cfg.get('model')!r} is neither in models ({sorted(models)}) "
                f"nor in pretraining ({sorted(pretraining)})"
            )
    for run, run_cfg in pretraining.items():
        if run in models:
            raise ConfigError(f"pretraining.{run}: a model has the same name; checkpoints would be ambiguous")
        if run_cfg.get("model") not in models:
            raise ConfigError(f"pretraining.{run}.model: {run_cfg.get('model')!r} is not in models ({sorted(models)})")
        for d in run_cfg.get("corpora") or []:
            if d not in datasets:
                raise ConfigError(f"pretraining.{run}.corpora: {d!r} is not in datasets ({sorted(datasets)})")
    for name in list(datasets) + list(systems):
        if "/" in name or name != name.strip() or not name:
            raise ConfigError(f"{name!r}: dataset and system names become file names; no '/' or spaces")
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


def resolve_paths(config: dict, basedir: str) -> None:
    """Relative file settings that do not exist from the working directory (a run with
    ``--directory``) are taken relative to the workflow (``config/deepspeed/cpu.json``)."""
    for run in (config.get("pretraining") or {}).values():
        path = run["training"]["deepspeed_config"]
        if not os.path.isabs(path) and not os.path.exists(path):
            run["training"]["deepspeed_config"] = os.path.join(basedir, path)


def table_systems(config: Mapping) -> list[str]:
    return list((config.get("table") or {}).get("systems") or config["systems"])


def table_datasets(config: Mapping) -> list[str]:
    return list((config.get("table") or {}).get("datasets") or config["datasets"])


def systems_of_type(config: Mapping, kind: str) -> list[str]:
    return [s for s, c in config["systems"].items() if c["type"] == kind]


def mirror(config: Mapping) -> str | None:
    """The download mirror: the ``mirror`` setting, else the LLMRET_MIRROR variable."""
    return config.get("mirror") or os.environ.get(MIRROR_ENV) or None


def prepare_environment(src_dir: str, cache_dir: str = ".cache") -> None:
    """Environment every job inherits: the library importable from ``src_dir`` (jobs are
    separate processes, maybe in a conda env, and the package need not be installed) and
    a persistent numba cache (ranx compiles its metrics; cached, that is ~15 s less per job).
    """
    paths = [src_dir] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != src_dir]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.abspath(os.path.join(cache_dir, "numba")))


def settings(cls: type[T], mapping: Mapping, what: str) -> T:
    """Build a settings dataclass from a config mapping; an unknown key is an error naming
    ``what`` (a typo must not silently fall back to a default)."""
    unknown = set(mapping) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {what}: {sorted(unknown)}")
    return cls(**dict(mapping))
