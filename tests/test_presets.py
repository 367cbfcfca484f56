"""Paper presets dry-run to complete DAGs: the right jobs, shared downloads and indexes,
and GPU resources on the training and encoding jobs."""

import re
import subprocess
import sys
from collections import Counter

import pytest
import yaml
from conftest import ROOT

PRESETS = ROOT / "config" / "presets"


def dry_run(tmp_path, preset, *targets, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-n",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(tmp_path / "w"),
        *extra,
        *targets,
        "--configfile",
        str(preset),
    ]  # --configfile last: it swallows what follows
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def planned(text):
    """(rule, wildcards, resources) of every job a dry run lists."""
    jobs = []
    for line in text.splitlines():
        line = line.strip()
        m = re.match(r"^(?:local)?rule (\w+):", line)
        if m:
            jobs.append({"rule": m.group(1), "wildcards": "", "resources": {}})
        elif jobs and line.startswith("wildcards:"):
            jobs[-1]["wildcards"] = line[len("wildcards:") :].strip()
        elif jobs and line.startswith("resources:"):
            pairs = (p.split("=", 1) for p in line[len("resources:") :].split(", "))
            jobs[-1]["resources"] = {k.strip(): v for k, v in pairs}
    return jobs


@pytest.mark.integration
def test_llara_preset_dag(tmp_path):
    out = dry_run(
        tmp_path,
        PRESETS / "llara-llama2-7b.yaml",
        "results/beir_table.csv",
        "results/msmarco_table.csv",
        "results/expected_check.tsv",
    )
    jobs = planned(out)
    counts = Counter(j["rule"] for j in jobs)
    # MS MARCO's archive is fetched once for corpus, dev and train; DL19/DL20 add 2 files each.
    assert counts["download_file"] == 5 and counts["assemble_dataset"] == 3
    # 13 BEIR datasets + the MS MARCO collection, which DL19 and DL20 search too.
    assert counts["bm25_index"] == 14
    assert counts["llara_pretrain"] == 1 and counts["finetune"] == 2 and counts["mine_negatives"] == 1
    assert counts["check_expected"] == 1 and counts["msmarco_table"] == 1
    # Only this preset's systems and runs: none of the default's SmolLM2/MiniLM jobs.
    assert not [j for j in jobs if re.search(r"smollm2|minilm", j["wildcards"])]
    rules = ("llara_pretrain", "finetune", "encode", "encode_corpus")
    gpus = {(j["rule"], j["resources"].get("gpu")) for j in jobs if j["rule"] in rules}
    assert gpus == {("llara_pretrain", "8"), ("finetune", "8"), ("encode", "1"), ("encode_corpus", "1")}
    # Every corpus in shards of <= 500k passages: MS MARCO's 8.8M in 18, one job each.
    shards = [j for j in jobs if j["rule"] == "encode_corpus"]
    msmarco = [j for j in shards if "dataset=msmarco-passage," in j["wildcards"] + ","]
    assert len(msmarco) == 3 * 18 and len(shards) == 3 * 76  # 3 dense systems; 76 shards over 14 corpora
    # exact (flat) dense search reads the stored shard vectors: no FAISS index job (docs/scale.md)
    assert counts["faiss_index"] == 0 and not counts["encode_corpus"] - len(shards)
    encodes = [j for j in jobs if j["rule"] in ("encode", "encode_corpus")]
    assert {re.search(r"system=([\w-]+)", j["wildcards"]).group(1) for j in encodes} == {
        "llara-7b",
        "base-ft-7b",
        "llara-ft-7b",
    }
    assert not [j for j in shards if "trec-dl" in j["wildcards"]]
    assert "results/mining/msmarco-llara/negatives.jsonl" in out


@pytest.mark.integration
def test_llara_preset_through_the_slurm_profile(tmp_path):
    """The paper preset as a cluster user dry-runs it: every GPU job on one node with the
    profile's CPUs per GPU, memory and time limit, and the GPU count of its config entry; the
    short CPU chains grouped."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    profile = ROOT / "profiles" / "slurm"
    extra = ("--workflow-profile", str(profile), "--slurm-status-command", "squeue")
    text = dry_run(tmp_path, PRESETS / "llara-llama2-7b.yaml", "results/beir_table.csv", extra=extra)
    jobs = planned(text)
    # 13 BEIR datasets unpacked and prepared, MS MARCO prepared; 13 BM25 indexes with their searches
    assert text.count("Group job dataset_prep") == 14 and text.count("Group job bm25") == 13
    sizes = yaml.safe_load((profile / "config.yaml").read_text())["set-resources"]
    by_rule = {}
    for j in jobs:
        by_rule.setdefault(j["rule"], []).append(j["resources"])
    for rule, gpus in (("llara_pretrain", "8"), ("finetune", "8"), ("encode", "1"), ("encode_corpus", "1")):
        for res in by_rule[rule]:
            assert res.get("gpu") == gpus, (rule, res)
            for key in ("cpus_per_gpu", "runtime", "nodes"):
                assert res.get(key) == str(sizes[rule][key]), (rule, key, res)
            assert res["nodes"] == "1", res
    assert all(r.get("runtime") == "60" for r in by_rule["bm25_search"])  # the profile's default
    # Memory from llmret.sizing, not the profile: 8 ranks each holding the 6.74B weights in
    # bf16, and an MS MARCO shard's 491k float32 4,096-dim vectors plus the 7B weights.
    assert "mem_mb" not in sizes["llara_pretrain"] and "mem_mb" not in sizes["encode_corpus"]
    for res in by_rule["llara_pretrain"] + by_rule["finetune"]:
        assert 8 * 6.74e9 * 2 / 2**20 < int(res["mem_mb"]) < 256_000, res
    msmarco = [j["resources"] for j in jobs if j["rule"] == "encode_corpus" and "msmarco" in j["wildcards"]]
    assert len(msmarco) >= 18 and len(msmarco) % 18 == 0  # 18 shards per system encoding it
    for res in msmarco:
        assert (8_841_823 / 18 * 4096 * 4 + 6.74e9 * 2) / 2**20 < int(res["mem_mb"]) < 64_000, res


@pytest.mark.slow
def test_csplade_preset_dag(tmp_path):
    out = dry_run(
        tmp_path,
        PRESETS / "csplade-llama3-8b.yaml",
        "results/beir_table.csv",
        "results/msmarco_table.csv",
        "results/quantization_table.csv",
        "results/expected_check.tsv",
    )
    jobs = planned(out)
    counts = Counter(j["rule"] for j in jobs)
    assert counts["csplade_adapt"] == 2 and counts["csplade_train"] == 3
    assert counts["mine_negatives"] == 1 and counts["bm25_search_train"] == 1  # BM25 negatives
    assert not counts["finetune"] and not counts["llara_pretrain"] and not counts["encode"]
    # 5 sparse systems: 13 BEIR corpora + MS MARCO (DL19/DL20 search its index) each, in
    # 76 shards of <= 500k passages (MS MARCO 18, the FEVERs and HotpotQA 11, DBPedia 10, ...)
    assert counts["sparse_encode_corpus"] == counts["sparse_index"] == 5 * 76 and counts["sparse_search"] == 5 * 16
    assert counts["quantization_table"] == 1 and counts["check_expected"] == 1
    gpus = {(j["rule"], j["resources"].get("gpu")) for j in jobs if j["rule"].startswith(("csplade", "sparse_enc"))}
    assert gpus == {
        ("csplade_adapt", "8"),
        ("csplade_train", "8"),
        ("sparse_encode", "1"),
        ("sparse_encode_corpus", "1"),
    }
    # the three trained models, the 8-bit and 4-bit systems reuse csplade-bi's model
    bases = {re.search(r"run=([\w.-]+)", j["wildcards"]).group(1) for j in jobs if j["rule"] == "csplade_train"}
    assert bases == {"csplade-llama31-8b", "csplade-echo-llama31-8b", "csplade-bi-llama31-8b"}
    assert not [j for j in jobs if re.search(r"smollm2|minilm", j["wildcards"])]


@pytest.mark.integration
def test_csplade_preset_through_the_slurm_profile(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    profile = ROOT / "profiles" / "slurm"
    extra = ("--workflow-profile", str(profile), "--slurm-status-command", "squeue")
    jobs = planned(dry_run(tmp_path, PRESETS / "csplade-llama3-8b.yaml", "results/msmarco_table.csv", extra=extra))
    sizes = yaml.safe_load((profile / "config.yaml").read_text())["set-resources"]
    seen = set()
    for j in jobs:
        if j["rule"] in ("csplade_adapt", "csplade_train", "sparse_encode", "sparse_encode_corpus", "sparse_index"):
            seen.add(j["rule"])
            for key in ("mem_mb", "runtime"):
                if key in sizes[j["rule"]]:  # else llmret.sizing's request
                    assert j["resources"].get(key) == str(sizes[j["rule"]][key]), j
    assert seen == {"csplade_adapt", "csplade_train", "sparse_encode", "sparse_encode_corpus", "sparse_index"}
    # 8 ranks, each loading Llama-3.1-8B's weights in bf16 before moving them to its GPU
    for j in jobs:
        if j["rule"] in ("csplade_adapt", "csplade_train"):
            assert 8 * 8.03e9 * 2 / 2**20 < int(j["resources"]["mem_mb"]) < 256_000, j
