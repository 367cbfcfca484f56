from pathlib import Path

import pytest
import yaml

from llmret import config as cfg

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    return yaml.safe_load((ROOT / "config" / name).read_text())


def test_shipped_configs_pass_the_cross_checks():
    for name in ("config.yaml", "smoke.yaml"):
        c = load(name)
        cfg.complete(c)
        cfg.check(c)


def test_known_beir_dataset_is_one_line():
    c = {"datasets": {"nfcorpus": {}, "msmarco": {}}, "systems": {"bm25": {"type": "bm25"}}}
    cfg.complete(c)
    cfg.check(c)
    assert c["datasets"]["nfcorpus"] == {
        "url": "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/nfcorpus.zip",
        "md5": "a89dba18a62ef92f7d323ec890a0d38d",
        "split": "test",
    }
    assert c["datasets"]["msmarco"]["split"] == "dev"


def test_unknown_dataset_needs_url_and_md5():
    c = {"datasets": {"mine": {"url": "http://x/mine.zip"}}, "systems": {"bm25": {"type": "bm25"}}}
    cfg.complete(c)
    with pytest.raises(cfg.ConfigError, match=r"datasets\.mine\.md5: not set"):
        cfg.check(c)


def test_shipped_configs_pass_the_schema():
    from snakemake.utils import validate

    for name in ("config.yaml", "smoke.yaml"):
        c = load(name)
        validate(c, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
        # defaults are filled in, down into each dataset
        assert c["evaluation"]["top_k"] == 1000
        assert all("relevance_level" in d and "subsample" in d for d in c["datasets"].values())


def test_schema_rejects_a_typo_with_the_key_named():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    c = load("smoke.yaml")
    c["datasets"]["scifact"]["md5s"] = "x"
    with pytest.raises(WorkflowError, match="md5s"):
        validate(c, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))


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
        (lambda c: c["systems"].update({"a/b": {"type": "bm25"}}), r"no '/'"),
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
        (lambda c: c["finetuning"].update({"llara-smollm2": {}}), r"finetuning\.llara-smollm2: a model or pretraining"),
        (
            lambda c: c["systems"]["llara-ft"].update(query_template="{text}"),
            r"systems\.llara-ft\.query_template: '\{text\}' differs from finetuning\.llara-ft-smollm2",
        ),
        (lambda c: c["msmarco_table"]["columns"].append({"dataset": "x", "metric": "ndcg@10"}), r"columns\[3\]"),
        (
            lambda c: c["msmarco_table"]["columns"].append({"dataset": "scifact", "metric": "map"}),
            r"msmarco_table\.columns\[3\]\.metric: 'map' is not in evaluation\.metrics",
        ),
    ],
)
def test_cross_check_errors_name_the_setting(edit, message):
    from snakemake.utils import validate

    c = load("smoke.yaml")
    validate(c, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    cfg.complete(c)
    edit(c)
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.check(c)


def test_mirror_setting_then_environment(monkeypatch):
    monkeypatch.delenv(cfg.MIRROR_ENV, raising=False)
    assert cfg.mirror({"mirror": ""}) is None
    monkeypatch.setenv(cfg.MIRROR_ENV, "/srv/mirror")
    assert cfg.mirror({"mirror": ""}) == "/srv/mirror"
    assert cfg.mirror({"mirror": "http://h/m"}) == "http://h/m"


def test_training_sections_share_one_schema_with_defaults(tmp_path, monkeypatch):
    from snakemake.utils import validate

    c = load("smoke.yaml")
    validate(c, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    pre = c["pretraining"]["llara-smollm2"]["training"]
    ft = c["finetuning"]["base-ft-smollm2"]["training"]
    assert pre["deepspeed_config"] == ft["deepspeed_config"] == "config/deepspeed/cpu.json"
    assert ft["learning_rate"] == 1.0e-4 and ft["lr_scheduler"] == "linear"
    assert c["finetuning"]["base-ft-smollm2"]["lora"]["target_modules"][0] == "q_proj"
    assert c["mining"]["scifact-minilm"]["margin"] is None
    # relative DeepSpeed paths resolve against the workflow for runs in another directory
    monkeypatch.chdir(tmp_path)
    cfg.resolve_paths(c, "/wf")
    assert ft["deepspeed_config"] == "/wf/config/deepspeed/cpu.json"
