"""Adding a training stage takes its module, its registry entry and its schema section
(docs/extending.md): a toy stage added that way to a copy of the checkout is checked,
wired and planned by the workflow, with no rule, check or list edited."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmret import registry
from llmret.checks import ConfigError

ROOT = Path(__file__).resolve().parents[1]

TOY_MODULE = '''"""A toy training stage (tests/test_extending.py): writes its base model unchanged."""

import shutil
from dataclasses import dataclass

from llmret import schema


@dataclass(frozen=True)
@schema.defaults_from("toy")
class ToySpec:
    scale: float

    def __post_init__(self):
        schema.check_bounds(self, "toy")


def train(model_dir, negatives_path, spec, lora, training, out_dir, adapter_dir, checkpoint_dir):
    shutil.copytree(model_dir, out_dir)
    shutil.copytree(model_dir, adapter_dir)
    return {"scale": ToySpec(**spec).scale}
'''

TOY_STAGE = registry.Stage(
    section="toy",
    spec="llmret.toy:ToySpec",
    entry="llmret.toy:train",
    data=registry.DataSource(
        argument="negatives_path", path="results/mining/{name}/negatives.jsonl", key="negatives", section="mining"
    ),
    bases=("pretraining",),
    serves=("dense",),
)

REGISTRY_ENTRY = """

# A toy stage (tests/test_extending.py).
register(
    Stage(
        section="toy",
        spec="llmret.toy:ToySpec",
        entry="llmret.toy:train",
        data=DataSource(
            argument="negatives_path", path="results/mining/{name}/negatives.jsonl", key="negatives", section="mining"
        ),
        bases=("pretraining",),
        serves=("dense",),
    )
)
"""

TOY_SCHEMA = {
    "type": "object",
    "propertyNames": {"$ref": "#/$defs/name"},
    "default": {},
    "description": "A toy stage (tests/test_extending.py).",
    "additionalProperties": {
        "type": "object",
        "additionalProperties": False,
        "required": ["model", "negatives"],
        "properties": {
            "model": {"type": "string", "description": "A key of models or of pretraining"},
            "negatives": {"type": "string", "description": "A key of mining"},
            "scale": {"type": "number", "exclusiveMinimum": 0, "default": 1.0, "description": "A toy setting"},
            "lora": {"$ref": "#/$defs/lora"},
            "gpus": {"$ref": "#/$defs/gpus", "default": "auto"},
            "training": {"$ref": "#/$defs/training"},
        },
    },
}

TOY_CONFIG = {
    "toy": {"toy-run": {"model": "smollm2-135m", "negatives": "scifact-minilm", "scale": 2.0}},
    "systems": {"toy-dense": {"type": "dense", "model": "toy-run", "max_query_length": 16, "max_passage_length": 32}},
}


def test_a_registered_stage_is_cross_checked(monkeypatch):
    """The config checks know a new stage from its registry entry alone."""
    from llmret import checks

    monkeypatch.setitem(registry.STAGES, "toy", TOY_STAGE)
    c = {
        "models": {"base": {}},
        "mining": {"neg": {}},
        "toy": {"t": {"model": "base", "negatives": "neg"}},
        "systems": {"d": {"type": "dense", "model": "t"}, "s": {"type": "sparse", "model": "t"}},
    }
    checks._check_stages(c)
    with pytest.raises(ConfigError, match=r"systems\.s\.model: 't' is not in models or a run of"):
        checks._check_system_models(c)
    c["toy"]["t"]["negatives"] = "nope"
    with pytest.raises(ConfigError, match=r"toy\.t\.negatives: 'nope' is not in mining"):
        checks._check_stages(c)
    c["toy"] = {"base": {"model": "base", "negatives": "neg"}}
    with pytest.raises(ConfigError, match=r"toy\.base: a model or another training run has the same name"):
        checks._check_stages(c)


def test_call_arguments_follow_the_stage():
    lora_stage, full_stage = registry.stage("finetuning"), registry.stage("pretraining")
    common = {"model_dir": "m", "spec": {}, "lora": {"r": 4}, "training": {}, "checkpoint_dir": "c"}
    args = lora_stage.call_arguments(data="n.jsonl", out_dir="o", adapter_dir="a", **common)
    assert args["negatives_path"] == "n.jsonl" and args["adapter_dir"] == "a" and args["lora"] == {"r": 4}
    args = full_stage.call_arguments(data="manifest.json", out_dir="o", adapter_dir=None, **common)
    assert args["manifest"] == "manifest.json" and "lora" not in args and "adapter_dir" not in args


def _copy_checkout(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    for name in files:
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _add_toy_stage(checkout: Path) -> list[str]:
    """The edits docs/extending.md lists, made as a developer would; returns the files touched."""
    (checkout / "src/llmret/toy.py").write_text(TOY_MODULE)
    with open(checkout / "src/llmret/registry.py", "a") as f:
        f.write(REGISTRY_ENTRY)
    schema_path = checkout / "src/llmret/config.schema.yaml"
    schema = yaml.safe_load(schema_path.read_text())
    schema["properties"]["toy"] = TOY_SCHEMA
    schema_path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return ["src/llmret/toy.py", "src/llmret/registry.py", "src/llmret/config.schema.yaml"]


@pytest.mark.slow
def test_a_toy_stage_runs_through_the_workflow_with_three_files_touched(tmp_path):
    checkout = tmp_path / "checkout"
    _copy_checkout(checkout)
    touched = _add_toy_stage(checkout)
    assert len(touched) == 3
    (checkout / "toy.yaml").write_text(yaml.safe_dump(TOY_CONFIG))
    data = ROOT.parent / "shared" / "data"
    if not data.is_dir():
        pytest.skip(f"no test data folder at {data}")
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "--cores",
        "1",
        "results/runs/toy-dense/scifact.trec",
        "--configfile",
        "config/smoke.yaml",
        "toy.yaml",
        "--config",
        f"mirror={data}",
    ]
    out = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    plan = out.stdout
    # the generic rule trains the toy run from its registry entry: base model, negatives, outputs
    block = plan[plan.index("rule train:") :].split("\n\n")[0]
    assert "wildcards: run=toy-run" in block
    assert "resources/models/smollm2-135m" in block and "results/mining/scifact-minilm/negatives.jsonl" in block
    assert "results/adapters/toy-run" in block and "logs/train/toy-run.log" in block
    assert "rule encode_corpus:" in plan  # the dense system encodes with the toy run's model
    # the schema/dataclass agreement test derives the toy stage's wiring from its entry too
    test = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_schema_specs.py", "-k", "toy"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert test.returncode == 0 and "passed" in test.stdout, test.stdout + test.stderr
