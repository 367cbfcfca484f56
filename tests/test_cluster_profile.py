"""profiles/slurm (issue 28): GPU jobs held to one node, partitions/account/QOS settable in
one place each, short CPU chains grouped safely, `gpus: auto` given a count, and the sbatch
line snakemake-executor-plugin-slurm builds from it for an 8-GPU training job."""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT

PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
TRAINING_RULES = ("llara_pretrain", "finetune", "csplade_adapt", "csplade_train")
ENCODING_RULES = ("encode_corpus", "encode", "sparse_encode_corpus", "sparse_encode")


def _profile(text: str | None = None) -> dict:
    """The profile as Snakemake reads it (YTE, YAML merge keys resolved)."""
    import yte

    return yte.process_yaml(io.StringIO(text if text is not None else PROFILE.read_text()), require_use_yte=True)


def _rules() -> tuple[set[str], set[str]]:
    """(every rule, the local rules) of the workflow's rule files."""
    rules, local = set(), set()
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        rules |= set(re.findall(r"^(?:rule|use rule \w+ as) (\w+)", text, re.M))
        for block in re.findall(r"^localrules:\n((?:    \w+,?\n)+)", text, re.M):
            local |= set(re.findall(r"\w+", block))
    return rules, local


def test_gpu_jobs_are_held_to_one_node_and_share_one_settings_block():
    res = _profile()["set-resources"]
    for rule in TRAINING_RULES + ENCODING_RULES:
        assert res[rule]["nodes"] == 1 and res[rule]["cpus_per_gpu"] == 8, rule
    assert res["llara_pretrain"]["runtime"] == 2880 and res["encode"]["runtime"] == 240
    assert "nodes" not in _profile()["default-resources"]  # a group job would sum it
    # one GPU partition, QOS and model for every GPU rule: uncommented in the block, merged everywhere
    text = PROFILE.read_text()
    for key, value in (("slurm_partition", "gpu"), ("qos", "gpu"), ("gpu_model", "a100")):
        text = text.replace(f'    # {key}: "{value}"\n', f'    {key}: "{value}"\n', 1)
    text = text.replace('  # slurm_partition: "cpu"\n', '  slurm_partition: "cpu"\n', 1)
    text = text.replace('  # qos: "normal"\n', '  qos: "normal"\n', 1)
    edited = _profile(text)
    for rule in TRAINING_RULES + ENCODING_RULES:
        r = edited["set-resources"][rule]
        assert (r["slurm_partition"], r["qos"], r["gpu_model"]) == ("gpu", "gpu", "a100"), rule
    assert (edited["default-resources"]["slurm_partition"], edited["default-resources"]["qos"]) == ("cpu", "normal")


def test_gpus_auto_is_one_gpu_per_job_under_the_profile():
    assert _profile()["config"] == {"gpus_auto": 1}


def test_only_chains_of_short_cpu_jobs_are_grouped():
    profile = _profile()
    rules, local = _rules()
    groups = profile["groups"]
    assert set(groups) <= rules and not set(groups) & local
    assert not set(groups) & set(TRAINING_RULES + ENCODING_RULES)  # a group sums parallel members' GPUs
    assert set(groups.values()) == {"dataset_prep", "bm25"}
    assert "group-components" not in profile  # bundling independent jobs sums their memory


class _Resources(dict):
    __getattr__ = dict.get


def test_an_8_gpu_training_job_is_submitted_to_one_node():
    """What the plugin's submit string is for llara-llama2-7b (resources as the preset's dry run
    shows them: gpu=8, llmret.sizing's mem_mb) with the profile's entry, QOS set."""
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    res = {**_profile()["default-resources"], **_profile()["set-resources"]["llara_pretrain"]}
    job = SimpleNamespace(threads=8, resources=_Resources(res, gpu=8, mem_mb=160000, qos="gpu"))
    params = {
        "run_uuid": "u",
        "slurm_logfile": "log",
        "comment_str": "rule_llara_pretrain_wildcards_llara-llama2-7b",
        "account": "",
        "partition": "",
        "workdir": "/w",
    }
    settings = SimpleNamespace(requeue=True, no_requeue=False, qos=None, reservation=None)
    call = submit.get_submit_command(job, params, settings).split()
    for flag in ("--nodes=1", "--requeue", "--cpus-per-gpu=8", "--qos=gpu"):
        assert flag in call, (flag, call)
    assert call[call.index("-t") + 1] == "2880" and call[call.index("--mem") + 1] == "160000"
    assert "--signal" not in " ".join(call)  # the plugin would not pass it on (see the profile)


def test_the_profile_explains_stopping_before_the_time_limit():
    text = PROFILE.read_text()
    assert "LLMRET_STOP_MARGIN_S" in text and "slurm_extra: --signal" in text
    assert Path(ROOT / "profiles" / "README.md").read_text().count("exit code 75") >= 1


def _dry_run(tmp_path, *extra):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "snakemake", "-n", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path / "w")]
    cmd += ["--workflow-profile", str(PROFILE.parent), "--slurm-status-command", "squeue", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.integration
def test_the_default_config_through_the_profile_asks_for_one_gpu_per_job_in_bf16(tmp_path):
    """Without counts in the config, the profile's gpus_auto makes every training and encoding
    job a one-GPU job on one node, training with ZeRO-2 in bf16 (deepspeed_config: auto);
    a --config that drops the profile's block is warned about on a Slurm submit host."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    text = _dry_run(tmp_path, "results/beir_table.csv")
    jobs = re.split(r"\n(?=\[)", text)
    training = [j for j in jobs if re.search(r"^\s*rule (llara_pretrain|finetune|csplade_train):", j, re.M)]
    assert len(training) == 6, len(training)
    for job in training:
        assert "gpu=1, nodes=1" in job and "gpu_zero2_bf16.json" in job, job
    assert "Group job dataset_prep" in text and "Group job bm25" in text
    import shutil

    from llmret import launch

    dropped = _dry_run(tmp_path, "results/beir_table.csv", "--config", "mirror=/nowhere")
    if shutil.which("sbatch") and launch.usable_gpu_count() == 0:
        assert "settings are gpus: auto" in dropped and "add gpus_auto=1 there" in dropped
