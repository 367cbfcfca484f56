"""The Slurm profile on a real Slurm: a single-node cluster on this machine
(scripts/slurm-local.sh: munged, slurmctld, slurmd, fake GPUs in gres.conf).

The smoke preset runs through ``--workflow-profile profiles/slurm`` with its training runs
given one GPU each, so they go through sbatch with ``--gpus=1`` and the profile's CPUs per
GPU, memory and time limit. Its table must equal the local session run's (conftest's
``smoke_run``). Needs root and Debian's slurmctld, slurmd, slurm-client and munge
(``bash scripts/slurm-local.sh install``; .ci/run installs them).
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import ROOT, SMOKE, snakemake

pytestmark = pytest.mark.integration

SCRIPT = ROOT / "scripts" / "slurm-local.sh"
PROFILE = ROOT / "profiles" / "slurm"
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel")
GPU_RULES = ("llara_pretrain", "finetune")
# The smoke run's training jobs each ask Slurm for one GPU (CPU torch trains as before:
# the fake devices are never opened). `gpus` is a resource, not a setting: no retraining.
# With GPUs, `deepspeed_config: auto` (the default config's) would train in bf16; the CPU
# file keeps the local run's float32 arithmetic (the file's path is no rerun key either).
CPU_DS = "training: {deepspeed_config: config/deepspeed/cpu.json}"
GPU_OVERLAY = (
    f"pretraining:\n  llara-smollm2: {{gpus: 1, {CPU_DS}}}\n"
    f"finetuning:\n  base-ft-smollm2: {{gpus: 1, {CPU_DS}}}\n  llara-ft-smollm2: {{gpus: 1, {CPU_DS}}}\n"
)
# The Slurm run builds the smoke preset's LLaRA rows on SciFact: every kind of job the
# executor must handle (downloads and tables kept local; imports, BM25, MiniLM mining, LLaRA
# shards and pretraining on both datasets' documents, a LoRA fine-tuning with a GPU,
# encoding, FAISS, search) in about a fifth of the local run's jobs (base-ft, a second
# fine-tuning of the same kind, is left to the full run). The CSPLADE and
# quantized rows and the DL19 column add more of the same kinds of jobs (their Slurm
# resources are checked by the dry run below and by tests/test_presets.py), and CI time is
# bounded: most of a smoke run is SmolLM2 encoding, which the DL19 column doubles.
# LLMRET_SLURM_FULL_SMOKE=1 runs the whole smoke preset through Slurm instead (all rows).
FULL_SMOKE = os.environ.get("LLMRET_SLURM_FULL_SMOKE") == "1"
SLURM_SYSTEMS = None if FULL_SMOKE else ["bm25", "llara", "llara-ft"]
# the training runs those rows need (the LLaRA pretraining, then one GPU fine-tuning from it)
SLURM_RUNS = None if FULL_SMOKE else ["llara-smollm2", "llara-ft-smollm2"]
SLURM_DATASETS = None if FULL_SMOKE else ["scifact"]
SLURM_OVERLAY = GPU_OVERLAY + (
    "" if FULL_SMOKE else f"table:\n  systems: {SLURM_SYSTEMS}\n  datasets: {SLURM_DATASETS}\n"
)
TABLES = ("beir_table.csv", "msmarco_table.csv") if FULL_SMOKE else ("beir_table.csv",)
# Hard limit for the whole Slurm run (the local smoke run takes ~20 minutes on 2 cores).
TIMEOUT_S = int(os.environ.get("LLMRET_SLURM_TEST_TIMEOUT", 3600))


def _missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (slurmctld and slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free ports found")


def _cluster(action: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def slurm_cluster():
    """The local cluster for this module; stopped (daemons by pid file) even when a test fails."""
    missing = _missing_binaries()
    if missing:
        pytest.skip(f"Slurm test cluster needs {', '.join(missing)}: run `bash scripts/slurm-local.sh install`")
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster runs its daemons as root (mknod, /etc/slurm/slurm.conf)")
    # Not under pytest's temp folder: munged wants every folder above its socket searchable by all.
    state = Path(tempfile.mkdtemp(prefix="llmret-slurm-"))
    state.chmod(0o755)
    env = {
        **os.environ,
        "LLMRET_SLURM_DIR": str(state),
        "LLMRET_SLURM_PORT": str(_free_port_pair()),
        # Keep finished jobs in squeue for the whole test (no accounting database).
        "LLMRET_SLURM_MIN_JOB_AGE": "7200",
    }
    up = _cluster("up", env)
    try:
        assert up.returncode == 0, f"slurm-local.sh up failed:\n{up.stdout}\n{up.stderr}"
        yield state
    finally:
        subprocess.run(["scancel", "--user", str(os.geteuid())], capture_output=True, timeout=60)
        down = _cluster("down", env)
        assert down.returncode == 0, f"slurm-local.sh down failed:\n{down.stdout}\n{down.stderr}"
        shutil.rmtree(state, ignore_errors=True)


def _run_bounded(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run ``cmd`` in its own process group; past ``timeout`` the group is killed (and the
    test fails) instead of waiting on a status loop forever."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(ROOT / ".cache" / "numba")}
    env.pop("LLMRET_MIRROR", None)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"Slurm smoke run exceeded {timeout} s; last output:\n{out[-6000:]}")
    return proc.returncode, out


def _sbatch_calls(log: str) -> dict[str, list[str]]:
    """rule -> the sbatch command lines the plugin logged (``--verbose``) for it."""
    calls: dict[str, list[str]] = {}
    for line in log.splitlines():
        if not line.startswith("sbatch call: "):
            continue
        m = re.search(r"--comment rule_(\w+?)(?:_wildcards_\S+)?\s", line)
        assert m, f"sbatch call without the plugin's rule comment: {line[:300]}"
        calls.setdefault(m.group(1), []).append(line[len("sbatch call: ") :])
    return calls


def _profile_resources(rule: str) -> dict:
    cfg = yaml.safe_load((PROFILE / "config.yaml").read_text())
    return {**cfg["default-resources"], **cfg["set-resources"].get(rule, {})}


def _sized_mem(rule: str) -> int:
    """A smoke training job's memory request (one GPU): llmret.sizing's, not the profile's."""
    from llmret import sizing

    config = yaml.safe_load(SMOKE.read_text())
    section = {"llara_pretrain": "pretraining", "finetune": "finetuning"}[rule]
    for run in config[section].values():  # as GPU_OVERLAY sets it
        run.setdefault("training", {})["deepspeed_config"] = str(ROOT / "config" / "deepspeed" / "cpu.json")
    mems = {sizing.training_mb(config, run, 1) for run in config[section]}
    assert (
        len(mems) == 1 and "mem_mb" not in yaml.safe_load((PROFILE / "config.yaml").read_text())["set-resources"][rule]
    )
    return mems.pop()


def _slurm_jobs() -> list[dict[str, str]]:
    """Slurm's own record of every job (squeue keeps them for MinJobAge)."""
    out = subprocess.run(
        [
            "squeue",
            "--states=all",
            "--noheader",
            "--Format=JobID:|,Comment:200|,State:|,tres-per-job:40|,NumCPUs:|,MinMemory:",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    keys = ("id", "comment", "state", "tres", "cpus", "mem")
    return [dict(zip(keys, (f.strip() for f in line.split("|")), strict=True)) for line in out.splitlines()]


def _finetuned_systems() -> set[str]:
    cfg = yaml.safe_load(SMOKE.read_text())
    lora_runs = {**cfg.get("finetuning", {}), **cfg.get("csplade", {})}
    return {name for name, sys_ in cfg["systems"].items() if sys_.get("model") in lora_runs}


# Measured (smoke preset, 2 CPU cores): encoding, BM25, FAISS, LLaRA pretraining and, since
# the LoRA matrices are initialised from the training seed, LoRA fine-tuning give identical
# results in every process, local or Slurm (CI run of stop 10: identical training losses,
# tables and per-query metrics for every row). Before that fix the fine-tuned rows moved by
# up to 0.02 nDCG@10 from run to run. The LoRA rows keep a 0.05 margin because a training
# job's float sums may still differ with its thread count (once seen for LLaRA: step-1 loss
# 47.84552 vs 47.84579); every other row must match exactly.
FINETUNED_ATOL = 0.05


def _assert_same_results(local_dir: Path, workdir: Path) -> None:
    finetuned = _finetuned_systems()
    pretraining_runs = set(yaml.safe_load(SMOKE.read_text()).get("pretraining", {}))
    for name in TABLES:
        local = pd.read_csv(local_dir / "results" / name).set_index("system")
        slurm = pd.read_csv(workdir / "results" / name).set_index("system")
        rows = SLURM_SYSTEMS or list(local.index)
        columns = [c for c in (SLURM_DATASETS or local.columns) if c != "avg"]
        assert list(slurm.index) == rows and [c for c in slurm.columns if c != "avg"] == columns, name
        local = local.loc[rows, columns]
        slurm = slurm[columns]
        exact = [s for s in local.index if s not in finetuned]
        pd.testing.assert_frame_equal(slurm.loc[exact], local.loc[exact], check_exact=True, obj=name)
        ft = [s for s in local.index if s in finetuned]
        diff = (slurm.loc[ft] - local.loc[ft]).abs().to_numpy()
        assert (diff <= FINETUNED_ATOL).all(), (
            f"{name}: fine-tuned rows differ by more than {FINETUNED_ATOL}:\n{slurm.loc[ft]}\n{local.loc[ft]}"
        )
    metrics = sorted(p.relative_to(workdir) for p in (workdir / "results" / "metrics").rglob("*.json"))
    if SLURM_SYSTEMS:
        assert {rel.parts[2] for rel in metrics} == set(SLURM_SYSTEMS)
        assert {rel.stem for rel in metrics} == set(SLURM_DATASETS) and len(metrics) == len(SLURM_SYSTEMS)
    else:
        assert metrics == sorted(p.relative_to(local_dir) for p in (local_dir / "results" / "metrics").rglob("*.json"))
    for rel in metrics:
        if rel.parts[2] in finetuned:
            continue
        local, slurm = (json.loads((d / rel).read_text()) for d in (local_dir, workdir))
        assert (slurm["metrics"], slurm["per_query"]) == (local["metrics"], local["per_query"]), rel
    cfg = yaml.safe_load(SMOKE.read_text())
    for log in (Path(f"{run}.jsonl") for run in SLURM_RUNS or [*cfg["pretraining"], *cfg["finetuning"]]):
        local, slurm = (
            [json.loads(x) for x in open(d / "results" / "train_logs" / log.name)] for d in (local_dir, workdir)
        )
        local, slurm = ([r["loss"] for r in rows if "loss" in r] for rows in (local, slurm))
        # The job's thread count (cpus per GPU under Slurm, 2 here) changes float sums in
        # the last digits (seen: 47.84552 vs 47.84579 at step 1), not the results.
        assert len(slurm) == len(local) and slurm[0] == pytest.approx(local[0], rel=1e-4), log.name
        if log.stem in pretraining_runs:
            assert slurm == pytest.approx(local, rel=1e-3), log.name


def _assert_submissions(log: str) -> dict[str, list[str]]:
    """The plugin's sbatch lines: which rules were jobs, and with what resources."""
    calls = _sbatch_calls(log)
    # Downloads, evaluation, tables and plots ran on this host, not as jobs.
    local_rules = {"download_dataset", "evaluate", "beir_table", "msmarco_table", "plot_table", "plot_train_log"}
    assert not local_rules & set(calls), sorted(calls)
    assert {"import_model", "encode", "llara_shard", "dense_search", *GPU_RULES} <= set(calls), sorted(calls)
    assert len(calls["finetune"]) == (2 if FULL_SMOKE else 1) and len(calls["llara_pretrain"]) == 1
    for rule in GPU_RULES:
        res = _profile_resources(rule)
        for call in calls[rule]:
            assert "--gpus=1" in call.split() and "--nodes=1" in call.split(), call
            assert f"--cpus-per-gpu={res['cpus_per_gpu']}" in call.split(), call
            assert re.search(rf"--mem {_sized_mem(rule)}\b", call) and re.search(rf"-t {res['runtime']}\b", call), call
    for call in calls["encode"]:
        assert "--gpus" not in call and "--cpus-per-task=2" in call.split(), call
        assert re.search(rf"--mem {_profile_resources('encode')['mem_mb']}\b", call), call
    return calls


def _free_etc_conf() -> Path:
    """/etc/slurm/slurm.conf for a test that writes it; skips unless root, Slurm and no such file."""
    if _missing_binaries() or os.geteuid() != 0:
        pytest.skip("needs the Slurm binaries and root")
    etc = Path("/etc/slurm/slurm.conf")
    if etc.exists() or etc.is_symlink():
        pytest.skip(f"{etc} exists already (a real or running cluster); not touching it")
    return etc


# Before the tests that start the module's cluster (it would hold /etc/slurm/slurm.conf).
def test_cluster_script_refuses_a_foreign_slurm_conf(tmp_path):
    """`up` never replaces an /etc/slurm/slurm.conf it did not write."""
    etc = _free_etc_conf()
    etc.parent.mkdir(parents=True, exist_ok=True)
    etc.write_text("# someone else's\n")
    try:
        env = {**os.environ, "LLMRET_SLURM_DIR": str(tmp_path / "state")}
        up = _cluster("up", env)
        assert up.returncode != 0 and "not this test cluster's" in up.stderr, up.stderr
        assert etc.read_text() == "# someone else's\n"
        assert not list((tmp_path / "state").glob("*.pid"))
    finally:
        etc.unlink()


def test_cluster_script_replaces_only_a_stopped_test_clusters_link(tmp_path):
    """A link left by a killed test run is replaced; one whose cluster still runs is not."""
    etc = _free_etc_conf()
    old = tmp_path / "old"
    old.mkdir()
    mark = "# Written by llmret scripts/slurm-local.sh: a single-node test cluster. Do not use in production.\n"
    (old / "slurm.conf").write_text(mark + "ClusterName=llmret-local\n")
    (old / "slurmctld.pid").write_text(f"{os.getpid()}\n")  # a live process: the old cluster runs
    etc.parent.mkdir(parents=True, exist_ok=True)
    etc.symlink_to(old / "slurm.conf")
    # Not under pytest's temp folder: munged wants every folder above its socket searchable by all.
    new_state = Path(tempfile.mkdtemp(prefix="llmret-slurm-"))
    new_state.chmod(0o755)
    env = {**os.environ, "LLMRET_SLURM_DIR": str(new_state), "LLMRET_SLURM_PORT": str(_free_port_pair())}
    try:
        up = _cluster("up", env)
        assert up.returncode != 0 and "not this test cluster's" in up.stderr, up.stderr
        assert os.readlink(etc) == str(old / "slurm.conf")
        (old / "slurmctld.pid").unlink()  # its daemons gone: the link is stale
        up = _cluster("up", env)
        assert up.returncode == 0, up.stderr
        assert "link left by a stopped test cluster" in up.stderr
        assert os.readlink(etc) == str(new_state / "slurm.conf")
    finally:
        _cluster("down", env)
        if etc.is_symlink() and os.readlink(etc) == str(old / "slurm.conf"):
            etc.unlink()
        shutil.rmtree(new_state, ignore_errors=True)
    assert not etc.exists() and not etc.is_symlink()


def test_smoke_preset_through_slurm_matches_local_run(smoke_run, slurm_cluster, tmp_path):
    local_dir, mirror = smoke_run
    workdir = tmp_path / "work"
    overlay = tmp_path / "gpus.yaml"
    overlay.write_text(SLURM_OVERLAY)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(workdir),
        "--workflow-profile",
        str(PROFILE),
        # The machine's two cores, as the local run had: two jobs at a time, two threads
        # each (the same thread count keeps the encoders' arithmetic the same).
        "--jobs",
        "2",
        "--max-threads",
        "2",
        "--local-cores",
        "2",
        # No slurmdbd here: sacct would never see the jobs (the plugin would poll forever).
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "5",
        "--seconds-between-status-checks",
        "5",
        "--verbose",
        # the tables only (targets before --configfile, which takes every argument after it)
        *(["all"] if FULL_SMOKE else ["results/beir_table.csv"]),
        "--configfile",
        str(SMOKE),
        str(overlay),
        # (this --config replaces the profile's config block: gpus_auto 0 keeps the systems'
        # encoding on the CPU, as locally; the training runs have their one GPU each)
        "--config",
        f"mirror={mirror}",
        "gpus_auto=0",
    ]
    started = time.monotonic()
    rc, log = _run_bounded(cmd, TIMEOUT_S)
    wall = time.monotonic() - started
    (tmp_path / "snakemake.log").write_text(log)
    print(f"Slurm smoke run: {wall:.0f} s wall")
    assert rc == 0, f"Slurm smoke run failed ({rc}) after {wall:.0f} s:\n{log[-8000:]}"

    _assert_same_results(local_dir, workdir)

    calls = _assert_submissions(log)

    # Slurm's side: every submitted job ran to completion; the training jobs held a GPU.
    jobs = [j for j in _slurm_jobs() if j["comment"].startswith("rule_")]
    assert len(jobs) == sum(len(c) for c in calls.values())
    assert {j["state"] for j in jobs} == {"COMPLETED"}, [j for j in jobs if j["state"] != "COMPLETED"]
    gpu_jobs = [j for j in jobs if re.match(r"rule_(llara_pretrain|finetune)_", j["comment"])]
    assert len(gpu_jobs) == (3 if FULL_SMOKE else 2) and all("gpu:1" in j["tres"] for j in gpu_jobs), gpu_jobs
    assert all(int(j["cpus"]) == _profile_resources("finetune")["cpus_per_gpu"] for j in gpu_jobs), gpu_jobs


def test_a_gpu_job_sees_only_its_own_gpus(slurm_cluster, tmp_path):
    """Under Slurm the job's devices come from Slurm (CUDA_VISIBLE_DEVICES), which
    llmret.launch keeps; two concurrent one-GPU jobs get different devices."""
    outs = []
    for i in range(2):
        out = tmp_path / f"job{i}.out"
        subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--gpus=1",
                "--cpus-per-gpu=1",
                "--mem=100",
                "-o",
                str(out),
                "--wrap",
                "echo $CUDA_VISIBLE_DEVICES; sleep 5",
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        )
        outs.append(out)
    deadline = time.monotonic() + 120
    while not all(o.is_file() and o.read_text().strip() for o in outs):
        assert time.monotonic() < deadline, "test jobs did not run within 2 minutes"
        time.sleep(0.5)
    assert sorted(o.read_text().strip() for o in outs) == ["0", "1"]


def test_profile_dry_run_shows_resources_per_job(tmp_path):
    """What the profile asks of Slurm per job, without a cluster (a dry run submits nothing)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    overlay = tmp_path / "gpus.yaml"
    overlay.write_text(GPU_OVERLAY)
    out = snakemake(
        tmp_path / "w",
        "-n",
        "--workflow-profile",
        str(PROFILE),
        "--slurm-status-command",
        "squeue",
        "--configfile",
        str(SMOKE),
        str(overlay),
        cores=None,
        timeout=600,
    )
    text = out.stdout + out.stderr
    # (A dry run lists local rules as `rule` too; the Slurm run checks which were local.)
    resources: dict[str, str] = {}
    rule = None
    for line in text.splitlines():
        m = re.match(r"^(?:local)?rule (\w+):", line.strip())
        if m:
            rule = m.group(1)
        elif line.strip().startswith("resources:") and rule:
            resources.setdefault(rule, line.strip())
    for rule in GPU_RULES:
        res = _profile_resources(rule)
        assert "gpu=1" in resources[rule], resources[rule]
        for key in ("cpus_per_gpu", "runtime"):
            assert f"{key}={res[key]}" in resources[rule], (rule, resources[rule])
        assert f"mem_mb={_sized_mem(rule)}" in resources[rule], (rule, resources[rule])
    assert f"mem_mb={_profile_resources('encode')['mem_mb']}" in resources["encode"]
    assert "runtime=60" in resources["bm25_search"]  # the profile's default, not the local profile's
