"""Cross-checks of the workflow config that a JSON schema cannot express.

The schema (``src/llmret/config.schema.yaml``) checks shapes and fills defaults; this module
checks names that become paths and references between sections (a system naming an unknown
model, a table naming an unknown dataset, a training run naming data that does not exist) so
a typo stops before any job runs, with the setting named. Training stages and system types
are checked from their entries in :mod:`llmret.registry`.
"""

from __future__ import annotations

from collections.abc import Mapping

from llmret import registry
from llmret.data.sources import raw_files
from llmret.plan import OPTIONAL_SECTIONS, table_systems
from llmret.specs import ConfigError

__all__ = ["ConfigError", "check", "check_names", "expected_cells", "prefill"]


# Names that become file and folder names (results/models/{run}, resources/datasets/{dataset},
# ...): a letter or digit first, so never ".", ".." or an option-like "-x"; no "/", spaces or
# glob characters. The schema's $defs/name carries the same pattern (a test checks).
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$"


NAMED_SECTIONS = ("datasets", "models", "systems", "mining")


def check_names(config: Mapping) -> None:
    """Refuse a name that would not be a plain file name, before anything uses it as a path
    (a dataset named ``..`` would make its unpack target ``resources/``, which a failed job's
    clean-up then deletes)."""
    import re

    for section in (*NAMED_SECTIONS, *registry.sections()):
        entries = config.get(section) or {}
        for name in entries if isinstance(entries, Mapping) else ():
            if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
                raise ConfigError(
                    f"{section}: the name {name!r} is not allowed: names become file and folder names and "
                    f"must match {NAME_PATTERN} (a letter or digit, then letters, digits, '.', '_', '+', '-')"
                )


def prefill(config: dict) -> None:
    """Create the per-run objects whose defaults live in the schema's ``$defs`` (``lora``,
    ``training``): the validator fills defaults inside a referenced object, not the object.
    Names are checked first, so no later step sees an unsafe one. An optional table or
    check set to null (to switch off what a merged config file turned on) is removed."""
    check_names(config)
    for section in OPTIONAL_SECTIONS:
        if section in config and config[section] is None:
            del config[section]
    for stage in registry.STAGES.values():
        for run in (config.get(stage.section) or {}).values():
            if isinstance(run, dict):
                run.setdefault("training", {})
                if stage.lora:
                    run.setdefault("lora", {})


def check(config: Mapping) -> None:
    _check_metrics(config)
    datasets = config.get("datasets") or {}
    systems = config.get("systems") or {}
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
        if kind not in registry.SYSTEM_TYPES:
            raise ConfigError(f"systems.{name}.type: must be one of {tuple(registry.SYSTEM_TYPES)}, got {kind!r}")
    _check_stages(config)
    _check_system_models(config)
    _check_mining(config)
    _check_msmarco_table(config)
    _check_csplade_runs(config)
    _check_quantization_table(config)
    _check_required_system_settings(config)
    for run, run_cfg in (config.get("pretraining") or {}).items():
        if not run_cfg.get("corpora") and "dpr_wiki" not in run_cfg:
            raise ConfigError(f"pretraining.{run}: no source of text; set corpora, dpr_wiki, or both")
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


def _check_stages(config: Mapping) -> None:
    """Every training run (llmret.registry): a checkpoint name no model or other run has, a
    base model its stage may start from (a causal LM where the stage needs one), and data
    that exists."""
    models = config.get("models") or {}
    taken = set(models)
    for run, stage, _ in registry.runs(config):
        if run in taken:
            raise ConfigError(
                f"{stage.section}.{run}: a model or another training run has the same name; "
                "checkpoints would be ambiguous"
            )
        taken.add(run)
    for run, stage, entry in registry.runs(config):
        where = f"{stage.section}.{run}"
        bases = {**models, **{b: True for section in stage.bases for b in config.get(section) or {}}}
        model = entry.get("model")
        if model not in bases:
            raise ConfigError(
                f"{where}.model: {model!r} is not in {' or '.join((registry.MODELS, *stage.bases))} ({sorted(bases)})"
            )
        if stage.causal_only and models.get(model, {}).get("kind") == "encoder":
            raise ConfigError(f"{where}.model: {model!r} is an encoder model; {stage.section} needs a causal LM")
        _check_stage_data(config, where, stage, entry)


def _check_stage_data(config: Mapping, where: str, stage: registry.Stage, entry: Mapping) -> None:
    source = stage.data
    if source.key is None:
        return
    known = config.get(source.section) or {}
    names = stage.data_names(entry)
    if source.required and not names:
        raise ConfigError(f"{where}.{source.key}: not set (a {source.section} entry)")
    for name in names:
        if name not in known:
            raise ConfigError(f"{where}.{source.key}: {name!r} is not in {source.section} ({sorted(known)})")


def _check_system_models(config: Mapping) -> None:
    """A system's model is a base model or a run of a stage that serves its type (a bow
    system needs only a tokenizer: any), and keeps the settings its run was trained with."""
    models = config.get("models") or {}
    for name, sys_cfg in (config.get("systems") or {}).items():
        kind, model = sys_cfg.get("type"), sys_cfg.get("model")
        if not registry.SYSTEM_TYPES[kind].model:
            continue
        any_run = registry.SYSTEM_TYPES[kind].any_run
        runs = {r: (s, e) for r, s, e in registry.runs(config) if any_run or kind in s.serves}
        if model not in models and model not in runs:
            serving = [s.section for s in registry.STAGES.values() if any_run or kind in s.serves]
            raise ConfigError(
                f"systems.{name}.model: {model!r} is not in models or a run of {', '.join(serving)} "
                f"({sorted({*models, *runs})})"
            )
        if kind == "sparse" and models.get(model, {}).get("kind") == "encoder":
            raise ConfigError(f"systems.{name}.model: {model!r} is an encoder model; sparse systems need a causal LM")
        if model in runs:
            stage, run = runs[model]
            for key in stage.shared_keys.get(kind, ()):
                if key in sys_cfg and key in run and sys_cfg[key] != run[key]:
                    raise ConfigError(
                        f"systems.{name}.{key}: {sys_cfg[key]!r} differs from {stage.section}.{model}.{key} "
                        f"{run[key]!r}; the model was trained to be used with the latter"
                    )


def _check_mining(config: Mapping) -> None:
    """A mining entry names a dataset with a training split and a configured retriever."""
    datasets = config.get("datasets") or {}
    systems = config.get("systems") or {}
    for name, m in (config.get("mining") or {}).items():
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


def _check_msmarco_table(config: Mapping) -> None:
    msmarco = config.get("msmarco_table")
    if not msmarco:
        return
    datasets = config.get("datasets") or {}
    for s in msmarco.get("systems") or []:
        if s not in (config.get("systems") or {}):
            raise ConfigError(f"msmarco_table.systems: {s!r} is not in systems ({sorted(config.get('systems') or {})})")
    metrics = (config.get("evaluation") or {}).get("metrics")
    for i, col in enumerate(msmarco["columns"]):
        if col["dataset"] not in datasets:
            raise ConfigError(f"msmarco_table.columns[{i}].dataset: {col['dataset']!r} is not in datasets")
        if metrics is not None and col["metric"] not in metrics:
            raise ConfigError(
                f"msmarco_table.columns[{i}].metric: {col['metric']!r} is not in evaluation.metrics {metrics}"
            )


def _check_csplade_runs(config: Mapping) -> None:
    """A CSPLADE run trains with the attention its adaptation run adapted the model to:
    attention the model never adapted to (or lost) breaks its vectors from step one. echo is
    free: it changes the input (two copies), not the causal attention."""
    adaptation = config.get("adaptation") or {}
    for run, r in (config.get("csplade") or {}).items():
        adapted = adaptation.get(r.get("model"))
        if adapted is not None and bool(r.get("bidirectional")) != bool(adapted.get("bidirectional")):
            raise ConfigError(
                f"csplade.{run}.bidirectional: {bool(r.get('bidirectional'))} differs from adaptation."
                f"{r['model']}.bidirectional {bool(adapted.get('bidirectional'))}; adapt the model as it will train"
            )


def _check_quantization_table(config: Mapping) -> None:
    quant = config.get("quantization_table")
    if not quant:
        return
    for s in quant["systems"]:
        if s not in (config.get("systems") or {}):
            raise ConfigError(f"quantization_table.systems: {s!r} is not in systems")
        if config["systems"][s]["type"] == "bm25":
            raise ConfigError(f"quantization_table.systems: {s!r} is BM25; it has no encoder to quantize")
    ds = quant.get("dataset")
    datasets = config.get("datasets") or {}
    if ds is not None and ds not in datasets:
        raise ConfigError(f"quantization_table.dataset: {ds!r} is not in datasets ({sorted(datasets)})")


def _check_required_system_settings(config: Mapping) -> None:
    """A system on a run whose stage dictates how its model must be fed and pooled (a model
    pretrained with the FlagEmbedding LLaRA variant: summary tokens in the templates, no EOS,
    mean of the last K states) must use exactly that: the schema's defaults (last token,
    ``{text}``) would silently not."""
    runs = {r: (s, e) for r, s, e in registry.runs(config) if s.required_system_settings}
    for name, sys_cfg in (config.get("systems") or {}).items():
        run = sys_cfg.get("model")
        if run not in runs or sys_cfg.get("type") not in runs[run][0].required_system_settings:
            continue
        stage, entry = runs[run]
        for key, want in registry.load(stage.required_system_settings[sys_cfg["type"]])(entry).items():
            if sys_cfg.get(key) != want:
                raise ConfigError(
                    f"systems.{name}.{key}: {sys_cfg.get(key)!r}, but {stage.section}.{run} "
                    f"(variant {entry.get('variant', 'paper')}) trained the model for {want!r}"
                )


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
