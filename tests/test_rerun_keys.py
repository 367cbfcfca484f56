"""Rerun keys (llmret.specs.rerun_keys) keep the params the workflow passed
before they had one home, byte for byte (a changed params value reruns users' finished jobs);
LLaRA's variants are classes that only they tell apart; sparse system types likewise."""

import ast
from pathlib import Path

import pytest
import yaml

from llmret import checks, plan
from llmret.llara import pretraining, variants
from llmret.llara.objective import LlaraObjective, encoder_settings
from llmret.specs import in_order, rerun_keys

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "llmret"

PAPER_128 = {
    "shards": 2,
    "max_text_length": 128,
    "seed": 13,
    "min_words": 8,
    "ebae_prompt": " The original sentence:",
    "ebar_prompt": " The next sentence:",
    "head": "copy",
}
FLAG_PROMPTS = {
    "ebae_prompt": '", summarize the above passage within eight words: ',
    "ebar_prompt": '", predict the following passage within eight words: ',
}
# PretrainSpec.from_config(raw).effective(order=list(raw)) as the code gave it before rerun
# keys had one home (computed then, pinned here): per config, run -> params.
PINNED = {
    (): {"llara-smollm2": PAPER_128},
    ("smoke.yaml",): {"llara-smollm2": {**PAPER_128, "max_text_length": 32}},
    ("presets/llara-llama2-7b.yaml",): {
        "llara-smollm2": PAPER_128,
        "llara-llama2-7b": {**PAPER_128, "shards": 64, "max_text_length": 512},
    },
}
# Runs added to the default config's (its settings plus these), pinned the same way.
EXTRA_RUNS = {
    "flag": (
        {"variant": "flagembedding"},
        {
            "shards": 2,
            "max_text_length": 128,
            "variant": "flagembedding",
            "seed": 13,
            "min_words": 8,
            **FLAG_PROMPTS,
            "text_prefix": '"',
            "summary_tokens": 8,
            "lm_weight": 1.0,
            "ebae_weight": 0.05,
            "ebar_weight": 0.05,
            "head": "tie",
        },
    ),
    "flag-k4": (
        {"variant": "flagembedding", "summary_tokens": 4, "head": "copy", "lm_weight": 0.5},
        {
            "shards": 2,
            "max_text_length": 128,
            "variant": "flagembedding",
            "summary_tokens": 4,
            "head": "copy",
            "lm_weight": 0.5,
            "seed": 13,
            "min_words": 8,
            **FLAG_PROMPTS,
            "text_prefix": '"',
            "ebae_weight": 0.05,
            "ebar_weight": 0.05,
        },
    ),
    "paper-w": (
        {"ebae_weight": 0.5},
        {
            "shards": 2,
            "max_text_length": 128,
            "ebae_weight": 0.5,
            "seed": 13,
            "min_words": 8,
            "variant": "paper",
            "ebae_prompt": " The original sentence:",
            "ebar_prompt": " The next sentence:",
            "text_prefix": "",
            "summary_tokens": 8,
            "lm_weight": 0.0,
            "ebar_weight": 1.0,
            "head": "copy",
        },
    ),
    "paper-prefix": (
        {"text_prefix": "x ", "seed": 7},
        {
            "shards": 2,
            "max_text_length": 128,
            "text_prefix": "x ",
            "seed": 7,
            "min_words": 8,
            "variant": "paper",
            "ebae_prompt": " The original sentence:",
            "ebar_prompt": " The next sentence:",
            "summary_tokens": 8,
            "lm_weight": 0.0,
            "ebae_weight": 1.0,
            "ebar_weight": 1.0,
            "head": "copy",
        },
    ),
    "paper-explicit": (
        {"variant": "paper", "ebae_prompt": " The original sentence:", "head": "copy", "lm_weight": 0.0},
        {
            "shards": 2,
            "max_text_length": 128,
            "ebae_prompt": " The original sentence:",
            "head": "copy",
            "seed": 13,
            "min_words": 8,
            "ebar_prompt": " The next sentence:",
        },
    ),
}


def _merge(a: dict, b: dict) -> dict:
    for k, v in b.items():
        a[k] = _merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
    return a


def _workflow_config(*presets: str, extra: dict | None = None) -> dict:
    """config/config.yaml with ``presets`` merged over it, as the workflow prepares it
    (workflow/rules/common.smk: prefill, the schema's defaults, complete)."""
    from snakemake.utils import validate

    c: dict = {}
    for name in ("config.yaml", *presets):
        c = _merge(c, yaml.safe_load((ROOT / "config" / name).read_text()))
    base = c["pretraining"]["llara-smollm2"]
    for run, settings in (extra or {}).items():
        c["pretraining"][run] = {**base, **settings}
    checks.prefill(c)
    validate(c, str(SRC / "config.schema.yaml"))
    plan.complete(c)
    return c


@pytest.mark.parametrize("presets", list(PINNED))
def test_pretraining_rerun_keys_are_the_params_of_before(presets):
    c = _workflow_config(*presets)
    assert set(c["pretraining"]) == set(PINNED[presets])
    for run, entry in c["pretraining"].items():
        raw = plan.entry_settings("pretraining", entry)
        got = rerun_keys(pretraining.PretrainSpec, raw)
        assert repr(got) == repr(PINNED[presets][run]), run  # the printed form: order and types count
        assert repr(pretraining.PretrainSpec.from_config(raw).effective(order=list(raw))) == repr(got)


def test_rerun_keys_of_every_variant_and_weight_are_the_params_of_before():
    c = _workflow_config(extra={run: settings for run, (settings, _) in EXTRA_RUNS.items()})
    for run, (_, want) in EXTRA_RUNS.items():
        raw = plan.entry_settings("pretraining", c["pretraining"][run])
        assert repr(rerun_keys(pretraining.PretrainSpec, raw)) == repr(want), run


def test_rerun_keys_default_to_the_settings_as_given():
    """A spec without its own rerun_keys: the entry's settings, not built, in their order."""
    from llmret.retrieval.encoder import EncoderSpec

    settings = {"pooling": "last", "query_template": "{text} q", "max_query_length": 64}
    assert repr(rerun_keys(EncoderSpec, settings)) == repr(settings)
    assert in_order({"a": 1, "b": 2, "c": 3}, ["c", "x", "a"]) == {"c": 3, "a": 1, "b": 2}
    assert list(in_order({"a": 1, "b": 2, "c": 3}, ["c", "x", "a"])) == ["c", "a", "b"]
    with pytest.raises(ValueError, match="unknown"):
        rerun_keys(pretraining.PretrainSpec, {"shardz": 2})


# --------------------------------------------------------------------------- LLaRA variants


def test_variants_are_a_registry_of_classes():
    assert variants.VARIANTS == {"paper": variants.Paper, "flagembedding": variants.FlagEmbedding}
    assert isinstance(LlaraObjective().kind, variants.Paper)
    assert isinstance(LlaraObjective(variant="flagembedding").kind, variants.FlagEmbedding)
    assert variants.variant_class("flagembedding").default_head == "tie"
    assert pretraining.PretrainSpec().head == "copy"
    with pytest.raises(ValueError, match=r"variant must be one of \('paper', 'flagembedding'\)"):
        variants.variant_class("flag")
    with pytest.raises(ValueError, match="variant must be one of"):
        pretraining.PretrainSpec(variant="flag")
    # The resolved class is no setting: the objective's fields (saved in llara.json) are as before.
    obj = LlaraObjective(variant="flagembedding")
    assert "kind" not in repr(obj) and obj == LlaraObjective(variant="flagembedding")


def test_required_encoder_settings_of_a_pretraining_entry():
    flag_entry = {"model": "smol", "corpora": ["scifact"], "variant": "flagembedding", "training": {"max_steps": 1}}
    want = {
        "query_template": '"{text}", predict the following passage within eight words: '
        + "".join(f"<s{i}>" for i in range(9, 17)),
        "passage_template": '"{text}", summarize the above passage within eight words: '
        + "".join(f"<s{i}>" for i in range(1, 9)),
        "append_eos": False,
        "pooling": "mean_last_8",
    }
    got = pretraining.required_encoder_settings(flag_entry)
    assert got == want and list(got) == list(want)
    assert got == encoder_settings(pretraining.PretrainSpec(variant="flagembedding").objective())
    k4 = pretraining.required_encoder_settings({**flag_entry, "summary_tokens": 4, "text_prefix": ""})
    assert k4["pooling"] == "mean_last_4" and k4["passage_template"].startswith("{text}")
    assert k4["passage_template"].endswith("words: <s1><s2><s3><s4>")
    # The paper's runs leave a dense system free (its llara.json still names the settings it trained for).
    assert pretraining.required_encoder_settings({"model": "smol", "corpora": ["scifact"]}) == {}
    assert pretraining.required_encoder_settings({"variant": "paper", "ebae_prompt": " Same:"}) == {}
    with pytest.raises(ValueError, match="variant must be one of"):
        pretraining.required_encoder_settings({"variant": "flag"})


def _name_tests(path: Path, names: set[str]) -> list[str]:
    """Comparisons (``==``, ``!=``, ``in``, ...) of anything with one of the string ``names``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            consts = [c for o in operands for c in ast.walk(o) if isinstance(c, ast.Constant)]
            if any(c.value in names for c in consts if isinstance(c.value, str)):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_variants_and_sparse_types_are_told_apart_in_one_place_only():
    """No module tests a LLaRA variant's name but llara/variants.py; no retrieval module or
    workflow script tests for ``bow`` but the sparse system registry (retrieval/bow.py)."""
    llara = [p for p in (SRC / "llara").glob("*.py") if p.name != "variants.py"]
    assert not [hit for p in llara for hit in _name_tests(p, {"paper", "flagembedding"})]
    scripts = [*(SRC / "retrieval").glob("*.py"), *(ROOT / "workflow" / "scripts").glob("*.py")]
    assert not [hit for p in scripts if p.name != "bow.py" for hit in _name_tests(p, {"bow"})]
