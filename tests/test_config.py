import copy
import re
from pathlib import Path

import pytest
import yaml

from llmret import checks, plan, specs
from llmret.data import sources

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    return yaml.safe_load((ROOT / "config" / name).read_text())


def validated(name):
    """A shipped config as the Snakefile sees it: per-run objects created, schema defaults filled."""
    from snakemake.utils import validate

    c = load(name)
    checks.prefill(c)
    validate(c, str(ROOT / "src" / "llmret" / "config.schema.yaml"))
    return c


def test_shipped_configs_pass_the_cross_checks():
    for name in ("config.yaml", "smoke.yaml"):
        c = load(name)
        plan.complete(c)
        checks.check(c)


def test_known_beir_dataset_is_one_line():
    c = {"datasets": {"nfcorpus": {}, "msmarco": {}}, "systems": {"bm25": {"type": "bm25"}}}
    plan.complete(c)
    checks.check(c)
    assert c["datasets"]["nfcorpus"] == {
        "url": "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/nfcorpus.zip",
        "md5": "a89dba18a62ef92f7d323ec890a0d38d",
        "split": "test",
        "zip_folder": "nfcorpus",
        "mirror_path": "beir/nfcorpus.zip",
        "ignore_identical_ids": True,
        "corpus_size": 3633,
    }
    assert c["datasets"]["msmarco"]["split"] == "dev"


def test_a_dataset_named_unlike_its_zip_finds_beir_through_zip_folder():
    c = {"datasets": {"nf-small": {"zip_folder": "nfcorpus", "subsample": {"max_queries": 5}}}}
    plan.complete(c)
    ds = c["datasets"]["nf-small"]
    assert ds["md5"] == "a89dba18a62ef92f7d323ec890a0d38d" and ds["url"].endswith("/nfcorpus.zip")
    assert ds["mirror_path"] == "beir/nfcorpus.zip"


def test_identical_ids_are_ignored_for_beir_zips_not_for_raw_files():
    c = load("presets/llara-llama2-7b.yaml")
    plan.complete(c)
    assert c["datasets"]["msmarco-passage"]["ignore_identical_ids"] is False  # official MS MARCO files
    assert c["datasets"]["arguana"]["ignore_identical_ids"] is True


def test_unknown_dataset_needs_url_and_md5():
    c = {"datasets": {"mine": {"url": "http://x/mine.zip"}}, "systems": {"bm25": {"type": "bm25"}}}
    plan.complete(c)
    with pytest.raises(specs.ConfigError, match=r"datasets\.mine\.md5: not set"):
        checks.check(c)


def test_shipped_configs_pass_the_schema():

    for name in ("config.yaml", "smoke.yaml"):
        c = validated(name)
        # defaults are filled in, down into each dataset
        assert c["evaluation"]["top_k"] == 1000
        assert all("relevance_level" in d and "subsample" in d for d in c["datasets"].values())


def test_schema_rejects_a_typo_with_the_key_named():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    c = load("smoke.yaml")
    c["datasets"]["scifact"]["md5s"] = "x"
    with pytest.raises(WorkflowError, match="md5s"):
        validate(c, str(ROOT / "src" / "llmret" / "config.schema.yaml"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["systems"]["minilm-l6"].update(model="nope"),
            r"systems\.minilm-l6\.model: 'nope' is not in models",
        ),
        (lambda c: c.setdefault("table", {}).update(datasets=["trec-covid"]), r"table\.datasets: 'trec-covid'"),
        (lambda c: c.setdefault("table", {}).update(systems=["bm25", "x"]), r"table\.systems: 'x'"),
        (lambda c: c["evaluation"].update(baseline="dense"), r"evaluation\.baseline: 'dense'"),
        (lambda c: c["systems"].update({"a/b": {"type": "bm25"}}), r"systems: the name 'a/b' is not allowed"),
        (
            lambda c: c["mining"]["scifact-minilm"].update(dataset="msmarco-dl19-5k"),
            r"datasets\.msmarco-dl19-5k has no train",
        ),
        (
            lambda c: c["mining"]["scifact-minilm"].update(retriever="nope"),
            r"mining\.scifact-minilm\.retriever: 'nope'",
        ),
        (lambda c: c["mining"]["scifact-minilm"].update(rank_from=50), r"rank_from <= rank_to <= depth"),
        (lambda c: c["finetuning"]["llara-ft-smollm2"].update(model="nope"), r"finetuning\.llara-ft-smollm2\.model"),
        (lambda c: c["finetuning"]["llara-ft-smollm2"].update(negatives="x"), r"llara-ft-smollm2\.negatives: 'x'"),
        (
            lambda c: c["finetuning"].update({"llara-smollm2": {}}),
            r"finetuning\.llara-smollm2: a model or another training run has the same name",
        ),
        (
            lambda c: c["systems"]["llara-ft"].update(query_template="{text}"),
            r"systems\.llara-ft\.query_template: '\{text\}' differs from finetuning\.llara-ft-smollm2",
        ),
        (lambda c: c["msmarco_table"]["columns"].append({"dataset": "x", "metric": "ndcg@10"}), r"columns\[3\]"),
        (lambda c: c["systems"]["csplade"].update(model="nope"), r"systems\.csplade\.model: 'nope' is not in models"),
        (lambda c: c["systems"]["csplade"].update(model="minilm-l6"), r"'minilm-l6' is an encoder model"),
        (
            lambda c: c["systems"]["csplade-echo"].update(echo=False),
            r"systems\.csplade-echo\.echo: False differs from csplade\.csplade-echo-smollm2\.echo True",
        ),
        (lambda c: c["csplade"]["csplade-smollm2"].update(negatives="x"), r"csplade\.csplade-smollm2\.negatives: 'x'"),
        (lambda c: c["csplade"]["csplade-smollm2"].update(model="base-ft-smollm2"), r"csplade-smollm2\.model"),
        (lambda c: c["adaptation"]["adapt-smollm2"].update(corpus="nfcorpus"), r"adapt-smollm2\.corpus: 'nfcorpus'"),
        (lambda c: c["adaptation"].update({"base-ft-smollm2": {}}), r"adaptation\.base-ft-smollm2: a model"),
        (lambda c: c["quantization_table"]["systems"].append("bm25"), r"'bm25' is BM25"),
        (lambda c: c["quantization_table"].update(dataset="x"), r"quantization_table\.dataset: 'x'"),
        (
            lambda c: c["msmarco_table"]["columns"].append({"dataset": "scifact", "metric": "map"}),
            r"msmarco_table\.columns\[3\]\.metric: 'map' is not in evaluation\.metrics",
        ),
        (lambda c: c["evaluation"].update(metrics=["ndcg@10", "recal@100"]), r"evaluation\.metrics\[1\]: 'recal@100'"),
        (lambda c: c["evaluation"].update(metrics=["ndcg@0"]), r"evaluation\.metrics\[0\]: 'ndcg@0'"),
        (lambda c: c["evaluation"].update(metrics=["recall@100-l2"]), r"evaluation\.metrics\[0\]"),
        (lambda c: c["evaluation"].update(metrics=["bpref@10"]), r"evaluation\.metrics\[0\]"),
        (lambda c: c["table"].update(metric="ndcg@100"), r"table\.metric: 'ndcg@100' is not in evaluation\.metrics"),
        (lambda c: c["quantization_table"].update(metric="map"), r"quantization_table\.metric: 'map'"),
    ],
)
def test_cross_check_errors_name_the_setting(edit, message):
    c = validated("smoke.yaml")
    plan.complete(c)
    edit(c)
    with pytest.raises(specs.ConfigError, match=message):
        checks.check(c)


def test_mirror_setting_then_environment(monkeypatch):
    monkeypatch.delenv(sources.MIRROR_ENV, raising=False)
    assert sources.mirror({"mirror": ""}) is None
    monkeypatch.setenv(sources.MIRROR_ENV, "/srv/mirror")
    assert sources.mirror({"mirror": ""}) == "/srv/mirror"
    assert sources.mirror({"mirror": "http://h/m"}) == "http://h/m"


def test_training_sections_share_one_schema_with_defaults(tmp_path, monkeypatch):
    c = validated("smoke.yaml")
    pre = c["pretraining"]["llara-smollm2"]["training"]
    ft = c["finetuning"]["base-ft-smollm2"]["training"]
    assert pre["deepspeed_config"] == ft["deepspeed_config"] == "config/deepspeed/cpu.json"
    assert ft["learning_rate"] == 1.0e-4 and ft["lr_scheduler"] == "linear"
    assert c["finetuning"]["base-ft-smollm2"]["lora"]["target_modules"][0] == "q_proj"
    assert c["mining"]["scifact-minilm"]["margin"] is None
    # the CSPLADE sections share the LoRA and training definitions
    adapt, sp = c["adaptation"]["adapt-smollm2"], c["csplade"]["csplade-smollm2"]
    assert adapt["lora"] == sp["lora"] == c["finetuning"]["base-ft-smollm2"]["lora"]
    assert adapt["training"]["deepspeed_config"] == sp["training"]["deepspeed_config"] == "config/deepspeed/cpu.json"
    assert (
        sp["temperature"] == 1.0
        and sp["lambda_q"] == 1e-3
        and (adapt["bow_weight"], adapt["scale_weight"]) == (1.0, 0.0)
    )
    bi = c["adaptation"]["adapt-bi-smollm2"]  # schema defaults: MNTP alone (the public recipe)
    assert (bi["bow_weight"], bi["scale_weight"], bi["mask_fraction"]) == (0.0, 0.0, 0.2)
    assert c["systems"]["csplade"]["sparse_index"] == {"engine": "exact"}
    # relative DeepSpeed paths resolve against the workflow for runs in another directory
    monkeypatch.chdir(tmp_path)
    plan.resolve_paths(c, "/wf")
    assert ft["deepspeed_config"] == "/wf/config/deepspeed/cpu.json"


def test_sparse_keys_checked_against_training_are_what_a_trained_model_fixes():
    from llmret import registry
    from llmret.retrieval.sparse_encoder import MODEL_KEYS

    shared = registry.stage("csplade").shared_keys["sparse"]
    assert set(shared) == set(MODEL_KEYS) - {"max_query_length", "max_passage_length"}


BAD_NAMES = [".", "..", "a/b", "with space", "-rf", "", "a*", "x" * 101]


@pytest.mark.parametrize("section", ["datasets", "models", "systems", "mining", "pretraining", "csplade"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_that_are_not_plain_file_names_are_refused_first(section, name):
    """Checked in prefill, before validation fills anything and before any path is made."""
    c = load("smoke.yaml")
    c[section][name] = {}
    with pytest.raises(checks.ConfigError, match=rf"^{section}: the name .* is not allowed"):
        checks.prefill(c)


def test_name_pattern_is_the_schemas():
    schema = yaml.safe_load((ROOT / "src" / "llmret" / "config.schema.yaml").read_text())
    assert schema["$defs"]["name"]["pattern"] == checks.NAME_PATTERN
    for section in checks.NAMED_SECTIONS:
        assert schema["properties"][section]["propertyNames"] == {"$ref": "#/$defs/name"}, section
    for good in ("scifact", "msmarco-dl19-5k", "bm25+", "llara_ft.v2", "E5"):
        checks.prefill({"datasets": {good: {}}})


def test_a_dataset_named_dotdot_plans_no_job(tmp_path):
    """The probe that lost resources/: now the workflow stops before building the DAG."""
    from conftest import snakemake

    overlay = tmp_path / "bad.yaml"
    overlay.write_text('datasets:\n  "..": {url: "http://127.0.0.1:9/x.zip", md5: ' + '"' + "0" * 32 + '"}\n')
    (tmp_path / "w" / "resources" / "models").mkdir(parents=True)
    out = snakemake(tmp_path / "w", "-n", "--configfile", str(overlay), check=False, timeout=300)
    assert out.returncode != 0
    assert "datasets: the name '..' is not allowed" in out.stdout + out.stderr
    assert (tmp_path / "w" / "resources" / "models").is_dir()


def test_every_metric_the_check_accepts_is_one_ranx_computes():
    """ranx's own parser and metric table accept every name the check does (looked up, not
    computed: each ranx metric compiles with numba on first use, ~5 s apiece)."""
    from ranx.meta.evaluate import extract_metric_and_params
    from ranx.metrics import metric_switch

    from llmret.results.evaluation import CUTOFF_METRICS, WHOLE_RUN_METRICS, check_metric

    for m in [f"{m}@5" for m in CUTOFF_METRICS] + list(CUTOFF_METRICS) + list(WHOLE_RUN_METRICS):
        check_metric(m)
        name = extract_metric_and_params(m)[0]
        assert callable(metric_switch(name)), m
    with pytest.raises(ValueError):
        metric_switch("recal")


def test_an_experiment_from_scratch_plans_only_its_own_jobs(tmp_path):
    """--replace-workflow-config: the given file is the whole config (the schema fills the
    defaults), so a BM25-only experiment on one dataset leaves the default's LLM rows behind."""
    from conftest import snakemake

    own = tmp_path / "bm25.yaml"
    own.write_text("datasets:\n  scifact: {}\nsystems:\n  bm25: {type: bm25}\n")
    out = snakemake(tmp_path / "w", "-n", "--configfile", str(own), "--replace-workflow-config", timeout=300)
    rules = re.findall(r"^(?:local)?rule (\w+):", out.stdout, flags=re.M)
    assert sorted(rules) == sorted(
        ["download_dataset", "unpack_dataset", "prepare_dataset", "bm25_index", "bm25_search"]
        + ["trec_qrels", "evaluate", "beir_table", "plot_table", "all"]
    )


def test_optional_tables_and_checks_switch_off_with_null():
    """Merged over the default, `expected: null` (or a table set to null) turns it off."""
    c = load("config.yaml")
    c.update(expected=None, msmarco_table=None, quantization_table=None)
    checks.prefill(c)
    from snakemake.utils import validate

    validate(c, str(ROOT / "src" / "llmret" / "config.schema.yaml"))
    assert checks.expected_cells(c) == []


def test_a_systems_lengths_apply_to_its_dataset_only():
    c = validated("smoke.yaml")
    c["systems"]["smollm2-135m"]["lengths"] = {"msmarco-dl19-5k": {"max_passage_length": 512}}
    plan.complete(c)
    checks.check(c)
    assert plan.system_settings(c, "smollm2-135m", "msmarco-dl19-5k")["max_passage_length"] == 512
    assert plan.system_settings(c, "smollm2-135m", "scifact")["max_passage_length"] == 64
    c["systems"]["smollm2-135m"]["lengths"] = {"nope": {"max_passage_length": 512}}
    with pytest.raises(checks.ConfigError, match=r"systems\.smollm2-135m\.lengths: 'nope' is not in datasets"):
        checks.check(c)


def test_gpus_auto_uses_a_gpu_when_there_is_one():
    c = validated("config.yaml")
    assert c["systems"]["smollm2-135m"]["gpus"] == "auto" and c["finetuning"]["llara-ft-smollm2"]["gpus"] == "auto"
    on_gpu = copy.deepcopy(c)
    plan.resolve_gpus(on_gpu, usable_gpus=2)
    plan.resolve_gpus(c, usable_gpus=0)
    for section, name in [
        ("systems", "smollm2-135m"),
        ("pretraining", "llara-smollm2"),
        ("csplade", "csplade-smollm2"),
    ]:
        assert on_gpu[section][name]["gpus"] == 1 and c[section][name]["gpus"] == 0
    assert "gpus" not in c["systems"]["bm25"]
    explicit = validated("config.yaml")
    explicit["finetuning"]["llara-ft-smollm2"]["gpus"] = 4
    plan.resolve_gpus(explicit, usable_gpus=0)
    assert explicit["finetuning"]["llara-ft-smollm2"]["gpus"] == 4


def test_usable_gpus_follow_slurm_inside_a_job(monkeypatch):
    from llmret import launch

    monkeypatch.setattr(launch, "machine_gpu_count", lambda: 8)
    assert launch.usable_gpu_count({}) == 8
    assert launch.usable_gpu_count({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert launch.usable_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert launch.usable_gpu_count({"SLURM_JOB_ID": "7"}) == 0  # a job that asked for no GPU
    assert launch.usable_gpu_count({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "0"}) == 1


def test_corpus_shards_are_planned_from_the_corpus_size_and_subsample():
    c = {
        "datasets": {
            "msmarco": {},
            "nfcorpus": {"subsample": {"max_docs": 1200}},
            "own": {"url": "u", "md5": "0" * 32},
        },
        "encoding": {"shard_size": 500_000},
    }
    plan.complete(c)
    assert len(plan.corpus_shards(c, "msmarco")) == 18  # 8,841,823 passages
    assert plan.corpus_shards(c, "own") == ["000-of-001"]  # size unknown
    c["encoding"]["shard_size"] = 500
    assert plan.corpus_shards(c, "nfcorpus") == ["000-of-003", "001-of-003", "002-of-003"]  # max_docs 1200


def test_a_csplade_run_must_attend_as_its_adaptation_run_did():
    c = load("smoke.yaml")
    plan.complete(c)
    c["csplade"]["csplade-bi-smollm2"]["model"] = "adapt-smollm2"  # adapted causally
    with pytest.raises(
        checks.ConfigError, match=r"csplade.csplade-bi-smollm2.bidirectional: True differs from adaptation"
    ):
        checks.check(c)
