"""The workflow's plan for dense search (issue 28): exact systems build no FAISS file, an ANN
index only where a system's ``index`` asks for one, mining's own index apart from the
evaluation's, and exact mining on the system's GPUs."""

import re

import pytest
from conftest import ROOT, snakemake

SMOKE = ROOT / "config" / "smoke.yaml"


def _jobs(tmp_path, overlay: str) -> list[dict]:
    """(rule, wildcards, input, resources) of every job a dry run of the smoke preset plans
    with ``overlay`` merged on top."""
    path = tmp_path / "overlay.yaml"
    path.write_text(overlay)
    out = snakemake(tmp_path / "w", "-n", "--configfile", str(SMOKE), str(path), "--config", "mirror=unused")
    jobs = []
    for line in (out.stdout + out.stderr).splitlines():
        line = line.strip()
        if m := re.match(r"^(?:local)?rule (\w+):", line):
            jobs.append({"rule": m.group(1)})
        elif jobs and (m := re.match(r"^(wildcards|input|resources): (.*)$", line)):
            jobs[-1][m.group(1)] = m.group(2)
    return jobs


@pytest.mark.slow
def test_exact_systems_have_no_faiss_jobs_and_mine_on_their_gpus(tmp_path):
    jobs = _jobs(tmp_path, "systems:\n  minilm-l6:\n    gpus: 1\n")
    assert not [j for j in jobs if j["rule"] == "faiss_index"]
    (train,) = [j for j in jobs if j["rule"] == "dense_search_train"]
    assert "minilm-l6/scifact/corpus/000-of-001.npy" in train["input"] and "gpu=1" in train["resources"]
    for search in (j for j in jobs if j["rule"] == "dense_search"):
        assert "corpus/000-of-001.npy" in search["input"] and "results/index/" not in search["input"]
        assert "gpu=" not in search["resources"]  # evaluation stays exact on the CPU


@pytest.mark.slow
def test_ann_indexes_where_asked_and_mining_apart(tmp_path):
    overlay = (
        "systems:\n"
        "  minilm-l6:\n    gpus: 1\n    index: {mining: {type: hnsw, ef_search: 64}}\n"
        "  smollm2-135m:\n    index: {type: ivf, nlist: 16, mining: {nprobe: 64}}\n"
    )
    jobs = _jobs(tmp_path, overlay)
    built = sorted(j["wildcards"] for j in jobs if j["rule"] == "faiss_index")
    assert built == [
        "system=minilm-l6, dataset=scifact, folder=faiss-mining, shard=000-of-001",
        "system=smollm2-135m, dataset=msmarco-dl19-5k, folder=faiss, shard=000-of-001",
        "system=smollm2-135m, dataset=scifact, folder=faiss, shard=000-of-001",
    ]
    (train,) = [j for j in jobs if j["rule"] == "dense_search_train"]
    assert "results/index/minilm-l6/scifact/faiss-mining/000-of-001.index" in train["input"]
    assert "gpu=0" in train["resources"]  # ANN mining runs on the CPU
    searches = {j["wildcards"]: j["input"] for j in jobs if j["rule"] == "dense_search"}
    assert (
        "results/index/smollm2-135m/scifact/faiss/000-of-001.index" in searches["system=smollm2-135m, dataset=scifact"]
    )
    assert "minilm-l6/scifact/corpus/000-of-001.npy" in searches["system=minilm-l6, dataset=scifact"]
