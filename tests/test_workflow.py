"""The smoke preset end to end through Snakemake, downloads served over HTTP on 127.0.0.1.

One session-scoped run (a few minutes on 2 cores) feeds several checks: the table, the
traceability of its cells, a second run doing nothing, and a changed setting rerunning
only what depends on it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, SHARED_DATA, SMOKE, snakemake

from llmret.data import trec

pytestmark = pytest.mark.integration

SPARSE_SYSTEMS = ["csplade", "csplade-echo", "csplade-bi"]  # the table's sparse rows
# SciFact, quantization table only
QUANTIZED = ["csplade-int8-dynamic", "csplade-int4", "csplade-int4-head"]
# Mean cosine of each precision's SciFact corpus vectors to float32's. After 2 training steps
# the vectors are nearly flat over all 49,152 terms, so keeping the top 128 (the preset's
# top_k) amplifies small weight changes into different term sets. Measured (CI run of stop
# 10, same model): int8 (weight-only) mean 0.963 (min 0.886), int4 0.438 (0.214), int8-dynamic 0.131
# (0.025), each with the LM head quantized too (csplade-int4-head's setting now); the head
# kept in float32 moves them little. Untruncated, all are >= 0.996 (tests/test_sparse.py
# bounds the encoder).
QUANT_COSINE_FLOOR = {"csplade-int4": 0.3, "csplade-int4-head": 0.3, "csplade-int8-dynamic": 0.07}


def test_table_has_every_system_and_dataset(smoke_run):
    workdir, _ = smoke_run
    table = pd.read_csv(workdir / "results" / "beir_table.csv")
    dense = ["bm25", "smollm2-135m", "llara", "base-ft", "llara-ft", "minilm-l6"]
    assert list(table["system"]) == dense + ["bow"] + SPARSE_SYSTEMS
    assert list(table.columns) == ["system", "scifact", "msmarco-dl19-5k", "avg"]
    values = table[["scifact", "msmarco-dl19-5k"]].to_numpy()
    assert ((values >= 0) & (values <= 1)).all()
    # a few training steps give sparse systems near-chance scores; the others beat chance
    assert (table.set_index("system").loc[dense, ["scifact", "msmarco-dl19-5k"]] > 0).all().all()
    assert table["avg"].tolist() == pytest.approx(values.mean(axis=1).tolist(), abs=1e-3)
    # Even on a subsample, BM25 and a trained sentence encoder beat chance by far, and so does
    # the bag of SmolLM2's tokens (the CSPLADE rows' lexical reference).
    assert table.set_index("system").loc["bm25", "scifact"] > 0.5
    assert table.set_index("system").loc["bow", "scifact"] > 0.3


def test_cells_trace_back_to_metrics_and_runs(smoke_run):
    workdir, _ = smoke_run
    table = pd.read_csv(workdir / "results" / "beir_table.csv").set_index("system")
    full = pd.read_csv(workdir / "results" / "beir_table_full.csv")
    assert set(full["metric"]) == {"ndcg@10", "mrr@10", "recall@100", "recall@1000"}
    for _, row in full[full["metric"] == "ndcg@10"].iterrows():
        metrics = json.loads((workdir / row["metrics"]).read_text())
        assert metrics["metrics"]["ndcg@10"] == pytest.approx(row["value"], abs=1e-4)
        assert table.loc[row["system"], row["dataset"]] == pytest.approx(row["value"], abs=1e-3)
        assert trec.read_header(workdir / row["run"])["system"] == row["system"]
        if row["system"] == "bm25":
            assert pd.isna(row["p_vs_bm25"])
        else:
            assert 0 <= row["p_vs_bm25"] <= 1
    meta = json.loads((workdir / "results" / "beir_table.meta.json").read_text())
    dl19 = meta["datasets"]["msmarco-dl19-5k"]
    assert dl19["subsample"]["max_queries"] == 2 and dl19["queries"] == 2
    assert dl19["original"] == {"documents": 5000, "queries": 43, "judgments": 4102}
    assert meta["datasets"]["scifact"]["original"]["queries"] == 300
    assert (workdir / "results" / "plots" / "beir_table.png").stat().st_size > 1000


def test_models_are_imported_as_safetensors(smoke_run):
    workdir, _ = smoke_run
    for name in ("smollm2-135m", "minilm-l6"):
        folder = workdir / "resources" / "models" / name
        assert (folder / "model.safetensors").is_file()
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.gguf"))
        info = json.loads((folder / "import.json").read_text())
        assert info["sha256"]["model.safetensors"]


def test_llara_pretraining_outputs(smoke_run):
    workdir, _ = smoke_run
    model = workdir / "results" / "models" / "llara-smollm2"
    assert (model / "model.safetensors").is_file() and (model / "projection.safetensors").is_file()
    assert not list(model.glob("*.bin")) and not list(model.glob("*.pt"))
    steps = [json.loads(line) for line in (workdir / "results" / "train_logs" / "llara-smollm2.jsonl").open()]
    logged = [r for r in steps if "loss" in r]
    assert [r["step"] for r in logged][-1] == 6
    assert all(r["loss_ebae"] > 0 and r["loss_ebar"] > 0 for r in logged)
    manifest = json.loads((workdir / "results" / "shards" / "llara-smollm2" / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) == 2
    assert (workdir / "results" / "plots" / "llara-smollm2_loss.png").is_file()


def test_mined_negatives_and_finetuned_models(smoke_run):
    workdir, _ = smoke_run
    from llmret.data import beir
    from llmret.training import mining

    qrels = beir.load_qrels(workdir / "results" / "data" / "scifact" / "train" / "qrels.tsv")
    records = mining.read_tevatron(workdir / "results" / "mining" / "scifact-minilm" / "negatives.jsonl")
    assert 0 < len(records) <= 32
    for r in records:
        negatives = {p["docid"] for p in r["negative_passages"]}
        assert negatives and not negatives & set(qrels[r["query_id"]])
        assert {p["docid"] for p in r["positive_passages"]} == set(qrels[r["query_id"]])
        assert len(negatives) <= 8
    for run in ("base-ft-smollm2", "llara-ft-smollm2"):
        model = workdir / "results" / "models" / run
        adapter = workdir / "results" / "adapters" / run
        assert (model / "model.safetensors").is_file() and (adapter / "adapter_model.safetensors").is_file()
        assert not [p for p in (*model.rglob("*"), *adapter.rglob("*")) if p.suffix in (".bin", ".pt", ".pth")]
        logged = [json.loads(line) for line in (workdir / "results" / "train_logs" / f"{run}.jsonl").open()]
        assert [r["step"] for r in logged if "loss" in r][-1] == 3
        assert (workdir / "results" / "plots" / f"{run}_loss.png").is_file()
    table = pd.read_csv(workdir / "results" / "msmarco_table.csv")
    assert list(table.columns) == ["system", "DL19 nDCG@10", "DL19 MRR@10", "DL19 R@1000"]
    assert list(table["system"]) == ["bm25", "smollm2-135m", "base-ft", "llara", "llara-ft", "minilm-l6"]
    beir_dl19 = pd.read_csv(workdir / "results" / "beir_table.csv").set_index("system")["msmarco-dl19-5k"]
    for _, row in table.iterrows():
        assert row["DL19 nDCG@10"] == pytest.approx(beir_dl19[row["system"]], abs=1e-3)


def test_training_table_lists_every_run_with_time_and_memory(smoke_run):
    workdir, _ = smoke_run
    table = pd.read_csv(workdir / "results" / "training_table.csv")
    stages = dict(zip(table["run"], table["stage"], strict=True))
    assert stages["llara-smollm2"] == "pretraining"
    assert stages["base-ft-smollm2"] == stages["llara-ft-smollm2"] == "finetuning"
    assert {"adaptation", "csplade"} <= set(stages.values())
    for _, row in table.iterrows():
        state = json.loads((workdir / "results" / "models" / row["run"] / "training_state.json").read_text())
        assert row["steps"] == state["steps"] and row["train_time_s"] == pytest.approx(state["train_time_s"], abs=0.05)
        assert row["device"] == "cpu" and pd.isna(row["peak_device_mb"])
        # Every run holds SmolLM2-135M's fp32 weights (538 MB) in memory; a wrong unit is off by 1000x.
        assert 540 < row["peak_host_rss_mb"] < 24_000, row.to_dict()


def test_expected_scores_hold_on_the_smoke_preset(smoke_run):
    """config/expected/smoke.yaml: every cell within tolerance (the run itself would have
    failed otherwise), and the report lists every cell of the file."""
    workdir, _ = smoke_run
    report = pd.read_csv(workdir / "results" / "expected_check.tsv", sep="\t")
    assert len(report) == 14 and set(report["status"]) == {"ok"}
    assert (report["measured"] - report["expected"]).abs().le(report["tolerance"] + 1e-4).all()


def test_finetuning_change_retrains_without_remining(smoke_run, tmp_path):
    jobs = _overlay_dry_run(
        smoke_run, tmp_path, "finetuning:\n  llara-ft-smollm2:\n    training:\n      learning_rate: 2.0e-4\n"
    )
    rules = {r for r, _ in jobs}
    assert {"finetune", "encode", "evaluate", "beir_table", "msmarco_table", "training_table"} <= rules
    assert not rules & {"mine_negatives", "dense_search_train", "prepare_train_split", "llara_pretrain", "llara_shard"}
    for rule, wc in jobs:
        if rule in ("finetune", "encode", "encode_corpus", "faiss_index", "dense_search", "evaluate"):
            assert "llara-ft" in wc, (rule, wc)


def test_learning_rate_change_retrains_without_retokenizing(smoke_run, tmp_path):
    rules = {
        r
        for r, _ in _overlay_dry_run(
            smoke_run, tmp_path, "pretraining:\n  llara-smollm2:\n    training:\n      learning_rate: 2.0e-5\n"
        )
    }
    assert "llara_pretrain" in rules and "plot_train_log" in rules
    assert not rules & {"llara_shard", "llara_manifest", "prepare_dataset", "import_model", "bm25_index"}


def test_second_run_does_nothing(smoke_run):
    workdir, mirror = smoke_run
    out = snakemake(workdir, "-n", "--configfile", str(SMOKE), "--config", f"mirror={mirror}")
    assert "Nothing to be done" in out.stdout + out.stderr


def _planned_jobs(text: str) -> list[tuple[str, str]]:
    """(rule, wildcards) pairs from a dry run's listing."""
    jobs, rule = [], None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if m:
            rule = m.group(1)
            jobs.append((rule, ""))
        elif line.strip().startswith("wildcards:") and jobs:
            jobs[-1] = (rule, line.strip()[len("wildcards:") :].strip())
    return jobs


def _overlay_dry_run(smoke_run, tmp_path, overlay_yaml: str) -> list[tuple[str, str]]:
    """The jobs a dry run of the finished smoke run plans with ``overlay_yaml`` merged on top."""
    workdir, mirror = smoke_run
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(overlay_yaml)
    out = snakemake(workdir, "-n", "--configfile", str(SMOKE), str(overlay), "--config", f"mirror={mirror}")
    return _planned_jobs(out.stdout + out.stderr)


def test_changed_setting_reruns_only_what_depends_on_it(smoke_run, tmp_path):
    jobs = _overlay_dry_run(smoke_run, tmp_path, "systems:\n  smollm2-135m:\n    max_passage_length: 48\n")
    rules = {r for r, _ in jobs}
    tables = {"beir_table", "msmarco_table", "plot_table", "check_expected", "index_sizes", "all"}
    assert rules == {"encode", "encode_corpus", "dense_search", "evaluate"} | tables
    for rule, wc in jobs:
        if rule in ("encode", "encode_corpus", "dense_search", "evaluate"):
            assert "system=smollm2-135m" in wc, (rule, wc)


def test_per_dataset_lengths_rerun_only_that_datasets_encodes(smoke_run, tmp_path):
    overlay = "systems:\n  smollm2-135m:\n    lengths: {msmarco-dl19-5k: {max_passage_length: 48}}\n"
    jobs = _overlay_dry_run(smoke_run, tmp_path, overlay)
    encodes = [wc for rule, wc in jobs if rule in ("encode", "encode_corpus")]
    # Both sides of DL19 (the settings header of the query side carries the lengths too).
    assert encodes and all("system=smollm2-135m" in wc and "dataset=msmarco-dl19-5k" in wc for wc in encodes)
    assert not [wc for rule, wc in jobs if "scifact" in wc]


def test_mining_retriever_change_remines_and_retrains(smoke_run, tmp_path):
    """MiniLM mines the negatives: changing how it encodes passages reaches fine-tuning."""
    rules = {
        r for r, _ in _overlay_dry_run(smoke_run, tmp_path, "systems:\n  minilm-l6:\n    max_passage_length: 96\n")
    }
    assert {"dense_search_train", "mine_negatives", "finetune"} <= rules
    assert not rules & {"llara_pretrain", "prepare_train_split", "bm25_index"}


def test_mirror_change_does_not_rerun_downloads(smoke_run):
    workdir, _ = smoke_run
    out = snakemake(workdir, "-n", "--configfile", str(SMOKE), "--config", f"mirror={SHARED_DATA}")
    assert "Nothing to be done" in out.stdout + out.stderr


def test_only_the_checksum_of_a_download_reruns_it(smoke_run, tmp_path):
    """A new URL, mirror path, retry count or timeout plans no job; a new md5 (other content)
    re-downloads and reruns what depends on the dataset."""
    moved = (
        "download: {retries: 7, timeout: 5}\n"
        "datasets:\n  scifact:\n    url: https://example.org/elsewhere/scifact.zip\n"
        "    mirror_path: beir/moved/scifact.zip\n"
    )
    assert _overlay_dry_run(smoke_run, tmp_path, moved) == []
    other = "datasets:\n  scifact:\n    md5: '" + "f" * 32 + "'\n"  # quoted: YAML reads 000...0 as 0
    rules = {r for r, _ in _overlay_dry_run(smoke_run, tmp_path, other)}
    assert {"download_dataset", "unpack_dataset", "bm25_index", "beir_table"} <= rules


def test_corrupt_corpus_line_fails_with_file_and_line(tmp_path, mirror_url):
    """A user-facing check: a broken dataset stops at validation, naming file and line."""
    import zipfile

    mirror = tmp_path / "mirror"
    (mirror / "beir").mkdir(parents=True)
    broken = mirror / "beir" / "scifact.zip"
    with zipfile.ZipFile(SHARED_DATA / "beir" / "scifact.zip") as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("corpus.jsonl"):
                lines = data.split(b"\n")
                lines[41] = lines[41][:30]
                data = b"\n".join(lines)
            dst.writestr(item, data)
    from llmret.data.download import md5sum

    config = tmp_path / "broken.yaml"
    config.write_text(
        "datasets:\n  scifact:\n    url: http://127.0.0.1:9/unused.zip\n"
        f"    md5: {md5sum(broken)}\n"
        "table:\n  datasets: [scifact]\n  systems: [bm25]\n"
    )
    workdir = tmp_path / "work"
    out = snakemake(
        workdir,
        "results/data/scifact/dataset.json",
        "--configfile",
        str(config),
        "--config",
        f"mirror={mirror}",
        check=False,
    )
    assert out.returncode != 0
    log = (workdir / "logs" / "prepare" / "scifact.log").read_text()
    assert re.search(r"corpus\.jsonl:42: invalid JSON", log), log[-2000:]
    assert not (workdir / "results" / "data" / "scifact" / "corpus.jsonl").exists()


def test_report_holds_tables_and_plot(smoke_run):
    workdir, mirror = smoke_run
    report = workdir / "report.html"
    snakemake(workdir, "--report", str(report), "--configfile", str(SMOKE), "--config", f"mirror={mirror}")
    html = report.read_text(encoding="utf-8")
    for name in ("beir_table.csv", "beir_table_full.csv", "beir_table.png", "msmarco_table.csv"):
        assert name in html


@pytest.mark.parametrize(("max_passages", "rule"), [(5000, "stream_dpr_wiki"), (None, "download_dpr_wiki")])
def test_dpr_wikipedia_pretraining_source_in_the_dag(tmp_path, max_passages, rule):
    """A run on DPR's Wikipedia streams a prefix or downloads the whole file, then shards it."""
    overlay = tmp_path / "dpr.yaml"
    overlay.write_text(
        "pretraining:\n  llara-smollm2:\n    corpora: []\n"
        f"    dpr_wiki: {{max_passages: {'null' if max_passages is None else max_passages}}}\n"
    )
    out = snakemake(
        tmp_path / "w", "-n", "results/shards/llara-smollm2/manifest.json", "--configfile", str(SMOKE), str(overlay)
    )
    jobs = _planned_jobs(out.stdout + out.stderr)
    rules = [r for r, _ in jobs]
    assert rule in rules and rules.count("llara_shard") == 2
    assert not {"stream_dpr_wiki", "download_dpr_wiki"} - {rule} & set(rules)
    assert "prepare_dataset" not in rules  # no BEIR corpus is read
    if max_passages:
        assert f"resources/pretraining/dpr-wiki-first{max_passages}.tsv" in out.stdout


def test_released_negatives_file_replaces_mining(tmp_path):
    """Negatives mined elsewhere (a Tevatron file) feed fine-tuning; nothing is retrieved."""
    overlay = tmp_path / "tevatron.yaml"
    overlay.write_text(
        "mining:\n  released:\n    file:\n      url: https://example.org/train.jsonl.gz\n"
        "      md5: d41d8cd98f00b204e9800998ecf8427e\n"
        "finetuning:\n  base-ft-smollm2:\n    negatives: released\n"
    )
    out = snakemake(tmp_path / "w", "-n", "results/models/base-ft-smollm2", "--configfile", str(SMOKE), str(overlay))
    rules = {r for r, _ in _planned_jobs(out.stdout + out.stderr)}
    assert {"download_negatives", "import_negatives", "finetune"} <= rules
    assert not rules & {"mine_negatives", "dense_search_train", "bm25_search_train", "prepare_train_split"}


def test_killed_pretraining_job_resumes_from_its_checkpoint(smoke_run, tmp_path):
    """Stop Snakemake mid-training (as a cluster preemption would), rerun the same command:
    the job resumes from the last checkpoint instead of starting over."""
    import signal
    import time

    workdir, mirror = smoke_run
    overlay = tmp_path / "kill.yaml"
    overlay.write_text(
        "pretraining:\n  llara-kill:\n    model: smollm2-135m\n    corpora: [scifact]\n    shards: 1\n"
        "    max_text_length: 32\n"
        "    training: {max_steps: 12, per_device_batch_size: 2, save_every: 3, log_every: 1}\n"
    )
    args = ["results/models/llara-kill", "--configfile", str(SMOKE), str(overlay), "--config", f"mirror={mirror}"]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--cores", "2", *args]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(ROOT / ".cache" / "numba")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = workdir / "results" / "checkpoints" / "llara-kill" / "latest"
    deadline = time.time() + 900
    try:
        while not (latest.is_file() and latest.read_text().strip() in ("step3", "step6", "step9")):
            assert proc.poll() is None, "training finished before it could be interrupted"
            assert time.time() < deadline, "no checkpoint within 15 minutes"
            time.sleep(0.5)
    finally:
        # What a scheduler does on preemption: SIGTERM to the job's processes (Snakemake and
        # the training process), SIGKILL if they linger.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            snakemake(workdir, "--unlock", *args)
    killed_at = int(latest.read_text().strip()[len("step") :])
    assert not (workdir / "results" / "models" / "llara-kill").exists()
    snakemake(workdir, "--rerun-incomplete", *args)
    log = [json.loads(line) for line in (workdir / "results" / "train_logs" / "llara-kill.jsonl").open()]
    resumes = [r for r in log if r.get("event") == "resume"]
    assert resumes and resumes[-1]["step"] >= killed_at
    assert max(r["step"] for r in log if "loss" in r) == 12
    assert (
        json.loads((workdir / "results" / "models" / "llara-kill" / "training_state.json").read_text())[
            "resumed_from_step"
        ]
        == resumes[-1]["step"]
    )
    # Nothing later reads llara-kill: free its ~2 GB (protected model, final checkpoint).
    for tree in ("models", "checkpoints", "shards"):
        _remove_tree(workdir / "results" / tree / "llara-kill")


def _remove_tree(path: Path) -> None:
    """rmtree that also removes Snakemake-protected (read-only) outputs."""
    for p in (path, *path.rglob("*")):
        if p.is_dir() and not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o700)
    shutil.rmtree(path)


def test_csplade_training_logs_and_models(smoke_run):
    """Adaptation (causal and bidirectional) then contrastive + FLOPS training: each saves a
    merged causal LM with its LM head and a record of how it must be used, and logs the
    dead-dimension fraction the adaptation phase is there to keep low."""
    workdir, _ = smoke_run
    for run in ("adapt-smollm2", "adapt-bi-smollm2"):
        logged = [json.loads(line) for line in (workdir / "results" / "train_logs" / f"{run}.jsonl").open()]
        steps = [r for r in logged if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2]
        assert all(r["loss_ntp"] > 0 and r["loss_bow"] > 0 and 0 <= r["dead_fraction"] < 1 for r in steps)
        record = json.loads((workdir / "results" / "models" / run / "adaptation.json").read_text())
        assert record["adaptation"]["bidirectional"] == (run == "adapt-bi-smollm2")
    for run, echo, bidi in (
        ("csplade-smollm2", False, False),
        ("csplade-echo-smollm2", True, False),
        ("csplade-bi-smollm2", False, True),
    ):
        model = workdir / "results" / "models" / run
        assert (model / "model.safetensors").is_file()
        assert (workdir / "results" / "adapters" / run / "adapter_model.safetensors").is_file()
        record = json.loads((model / "csplade.json").read_text())
        assert (record["encoder"]["echo"], record["encoder"]["bidirectional"]) == (echo, bidi)
        logged = [json.loads(line) for line in (workdir / "results" / "train_logs" / f"{run}.jsonl").open()]
        steps = [r for r in logged if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2]
        for r in steps:
            assert r["loss_contrastive"] >= 0 and r["loss_flops_q"] > 0 and r["loss_flops_d"] > 0
            assert 0 < r["nnz_q"] <= 49152 and 0 < r["nnz_d"] <= 49152
        # the FLOPS weight warms up quadratically over 2 steps: 1e-3 * (s / 2) ** 2
        assert [r["lambda_d"] for r in steps] == pytest.approx([2.5e-4, 1e-3])


def test_sparse_runs_index_sizes_and_quantization_table(smoke_run):
    workdir, _ = smoke_run
    from llmret.retrieval import sparse_vectors

    table = pd.read_csv(workdir / "results" / "beir_table.csv").set_index("system")
    assert not set(QUANTIZED) & set(table.index)
    assert not [p for s in QUANTIZED for p in (workdir / "results" / "runs" / s).glob("msmarco*")]
    for system in SPARSE_SYSTEMS + QUANTIZED:
        header = json.loads((workdir / "results" / "runs" / system / "scifact.trec.json").read_text())["settings"]
        assert header["type"] == "sparse" and header["index"]["engine"] == "exact"
        assert header["index"]["n_docs"] == len(
            sparse_vectors.load_sparse(
                workdir / "results" / "sparse" / system / "scifact" / "corpus" / "000-of-001.safetensors"
            ).ids
        )
        stats = json.loads(
            (workdir / "results" / "sparse" / system / "scifact" / "corpus" / "000-of-001.json").read_text()
        )
        assert stats["vocab_size"] == 49152 and stats["texts_per_second"] > 0
        assert 0 < stats["nnz_mean"] <= stats["nnz_max"] <= 128  # the preset's top_k
    sizes = pd.read_csv(workdir / "results" / "index_sizes.csv")
    learned = [s for s in table.index if s != "bm25"]
    assert sorted(set(sizes["system"])) == sorted(learned)
    assert set(sizes["dataset"]) == {"scifact", "msmarco-dl19-5k"}
    dense = sizes[sizes["type"] == "dense"]
    assert (dense["engine"] == "exact").all()
    # exact search reads the stored vectors: documents x dim x 4 bytes (float32 in smoke), plus a header
    assert ((dense["index_mb"] * 1e6 - dense["documents"] * dense["dim_or_nnz_per_doc"] * 4).abs() < 1000).all()
    sparse_rows = sizes[sizes["type"] == "sparse"]
    assert len(sparse_rows) == 2 * len(SPARSE_SYSTEMS) and (sparse_rows["engine"] == "exact").all()
    assert (sparse_rows["dim_or_nnz_per_doc"] <= 128).all()
    assert len(sizes[sizes["type"] == "bow"]) == 2  # the bag of tokens: at most 32 a passage here
    assert (sizes[sizes["type"] == "bow"]["dim_or_nnz_per_doc"] <= 32).all()

    quant = pd.read_csv(workdir / "results" / "quantization_table.csv")
    assert list(quant["system"]) == ["csplade", *QUANTIZED]
    assert list(quant["precision"]) == ["float32", "int8-dynamic", "int4", "int4"]
    assert list(quant["head_precision"]) == ["float32"] * 3 + ["int4"]
    mb = quant.set_index("system")["weights_mb"]
    assert mb["csplade"] > mb["csplade-int4"] > 0
    # SmolLM2's head is tied to the float32 embedding table: quantizing it stores a copy
    assert mb["csplade-int4-head"] > mb["csplade-int4"]
    assert mb["csplade"] > mb["csplade-int8-dynamic"] > mb["csplade-int4"]
    assert (quant["dataset"] == "scifact").all() and quant["ndcg@10"].between(0, 1).all()
    assert (workdir / "results" / "plots" / "quantization_table.png").stat().st_size > 1000


def test_quantized_sparse_encoders_stay_close_to_full_precision(smoke_run):
    """The same trained model at lower precision: corpus vectors keep their mass on the same
    terms, int8 (weight-only) closely, int4 and int8-dynamic less (see QUANT_COSINE_FLOOR)."""
    workdir, _ = smoke_run
    from llmret.retrieval import sparse_vectors

    def vectors(system):
        return sparse_vectors.load_sparse(
            workdir / "results" / "sparse" / system / "scifact" / "corpus" / "000-of-001.safetensors"
        )

    ref = vectors("csplade")
    for system, floor in QUANT_COSINE_FLOOR.items():
        other = vectors(system)
        assert other.ids == ref.ids
        a, b = ref.matrix, other.matrix
        dots = np.asarray(a.multiply(b).sum(1)).ravel()
        norms = np.sqrt(np.asarray(a.multiply(a).sum(1)).ravel() * np.asarray(b.multiply(b).sum(1)).ravel())
        cosine = dots / np.maximum(norms, 1e-12)
        assert cosine.mean() >= floor, (system, cosine.mean(), cosine.min())


def test_csplade_setting_change_retrains_without_readapting_or_remining(smoke_run, tmp_path):
    jobs = _overlay_dry_run(smoke_run, tmp_path, "csplade:\n  csplade-smollm2:\n    lambda_d: 2.0e-3\n")
    rules = {r for r, _ in jobs}
    assert {"csplade_train", "sparse_encode", "sparse_index", "sparse_search", "quantization_table"} <= rules
    assert not rules & {"csplade_adapt", "mine_negatives", "finetune", "encode", "llara_pretrain"}
    trained = {wc for r, wc in jobs if r == "csplade_train"}
    assert trained == {"run=csplade-smollm2"}
    encoded = {wc.split(",")[0] for r, wc in jobs if r == "sparse_encode"}
    # the csplade model and its precision variants, not the echo / bidirectional systems
    assert encoded == {f"system={s}" for s in ("csplade", *QUANTIZED)}


def test_sparse_engine_change_reindexes_without_reencoding(smoke_run, tmp_path):
    jobs = _overlay_dry_run(
        smoke_run,
        tmp_path,
        "systems:\n  csplade-bi:\n    sparse_index: {engine: seismic, n_postings: 0, query_cut: 0}\n",
    )
    rules = {r for r, _ in jobs}
    assert {"sparse_index", "sparse_search", "evaluate", "index_sizes"} <= rules
    assert not rules & {"sparse_encode", "csplade_train", "csplade_adapt"}
    assert all("system=csplade-bi" in wc for r, wc in jobs if r in ("sparse_index", "sparse_search", "evaluate"))


def test_one_zip_backs_two_differently_subsampled_datasets(tmp_path, mirror_url):
    """zip_folder: a dataset named unlike its zip's folder (here a subsampled copy of SciFact
    beside the full one) finds BEIR's URL, md5 and mirror path through it."""
    md5 = yaml.safe_load(SMOKE.read_text())["datasets"]["scifact"]["md5"]  # the mirror's copy too
    own = tmp_path / "two.yaml"
    own.write_text(
        f"datasets:\n  scifact: {{md5: {md5}}}\n"
        f"  scifact-small: {{zip_folder: scifact, md5: {md5}, subsample: {{max_queries: 20, max_docs: 200}}}}\n"
        "systems:\n  bm25: {type: bm25}\n"
    )
    workdir = tmp_path / "w"
    snakemake(workdir, "--configfile", str(own), "--replace-workflow-config", "--config", f"mirror={mirror_url}")
    table = pd.read_csv(workdir / "results" / "beir_table.csv").set_index("system")
    assert list(table.columns) == ["scifact", "scifact-small", "avg"]
    meta = json.loads((workdir / "results" / "beir_table.meta.json").read_text())
    assert meta["datasets"]["scifact"]["queries"] == 300
    assert meta["datasets"]["scifact-small"]["queries"] == 20
    # BM25 on full SciFact is Pyserini's flat baseline (as in config/expected/default.yaml).
    assert table.loc["bm25", "scifact"] == pytest.approx(0.679, abs=0.001)


def test_a_query_that_is_a_corpus_document_does_not_retrieve_itself(tmp_path):
    """BEIR's ignore_identical_ids, on by default for BEIR zips: an ArguAna-like dataset whose
    query q1 is also document q1 (same text, so BM25 ranks it first) scores the other
    documents; switched off, the query's own document comes back first."""
    import zipfile

    from llmret.data.download import md5sum

    mirror = tmp_path / "mirror"
    (mirror / "beir").mkdir(parents=True)
    arc = mirror / "beir" / "selfq.zip"
    docs = {"q1": "cats purr on warm laps", "d2": "warm cats purr loudly", "d3": "dogs bark at night"}
    with zipfile.ZipFile(arc, "w") as z:
        z.writestr("selfq/corpus.jsonl", "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in docs.items()))
        z.writestr("selfq/queries.jsonl", json.dumps({"_id": "q1", "text": docs["q1"]}) + "\n")
        z.writestr("selfq/qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    runs = {}
    for flag in ("", "false"):
        own = tmp_path / f"selfq{flag}.yaml"
        setting = f"ignore_identical_ids: {flag}, " if flag else ""
        own.write_text(
            f"datasets:\n  selfq: {{{setting}url: http://127.0.0.1:9/selfq.zip, md5: {md5sum(arc)}}}\n"
            "systems:\n  bm25: {type: bm25}\n"
        )
        workdir = tmp_path / f"w{flag}"
        snakemake(
            workdir,
            "results/runs/bm25/selfq.trec",
            "--configfile",
            str(own),
            "--replace-workflow-config",
            "--config",
            f"mirror={mirror}",
        )
        lines = (workdir / "results" / "runs" / "bm25" / "selfq.trec").read_text().splitlines()
        runs[flag] = [line.split()[2] for line in lines if not line.startswith("#")]
    assert runs[""][0] == "d2" and "q1" not in runs[""]
    assert runs["false"][0] == "q1" and "d2" in runs["false"]
