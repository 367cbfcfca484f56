"""GPUs on a box and on a cluster (issue 28): claiming inside CUDA_VISIBLE_DEVICES, the device
count from CUDA (mocked: no GPU here), what `gpus: auto` stands for (gpus_auto, which the
Slurm profile sets), `deepspeed_config: auto`, and the global batch check."""

import copy
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from llmret import launch, plan, registry
from llmret.training import arguments
from llmret.training.job_settings import (
    CPU_DEEPSPEED_CONFIG,
    GPU_DEEPSPEED_CONFIG,
    check_global_batch,
    deepspeed_config_for,
)


@pytest.fixture
def locks(monkeypatch, tmp_path):
    """Outside Slurm, locks in a temp folder; CUDA_VISIBLE_DEVICES restored afterwards."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv(launch.LOCK_DIR_ENV, str(tmp_path / "locks"))
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    yield tmp_path / "locks"
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    if saved is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = saved


# --------------------------------------------------------------------------- claiming


def test_claims_stay_inside_the_visible_list_keyed_by_device(locks, monkeypatch):
    """A box where CUDA_VISIBLE_DEVICES is already set: two jobs claim different devices of
    that list (before, both ran on its first device), locked by their indices."""
    monkeypatch.setattr(launch, "machine_gpu_count", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5,7")
    assert launch.claimable_devices() == ["2", "5", "7"]
    with launch.claimed_devices(1) as first, launch.claimed_devices(2) as second:
        assert first == ["2"] and second == ["5", "7"]
        assert sorted(p.name for p in locks.iterdir()) == ["gpu2.lock", "gpu5.lock", "gpu7.lock"]
    with launch.claimed_devices(1):  # another job holds device 2
        with launch.visible_devices(1) as mine:
            assert mine == ["5"] and os.environ["CUDA_VISIBLE_DEVICES"] == "5"


def test_uuid_entries_are_claimed_by_their_identity(locks, monkeypatch):
    monkeypatch.setattr(launch, "machine_gpu_count", lambda: 2)
    uuids = "GPU-8f3e0c1a-aaaa-bbbb-cccc-000000000001,MIG-GPU-8f3e0c1a-aaaa/1/0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuids)
    with launch.claimed_devices(1) as a, launch.claimed_devices(1) as b:
        assert a + b == uuids.split(",")
    names = sorted(p.name for p in locks.iterdir())
    assert names == ["gpu-GPU-8f3e0c1a-aaaa-bbbb-cccc-000000000001.lock", "gpu-MIG-GPU-8f3e0c1a-aaaa_1_0.lock"]
    assert launch.lock_name("03") == launch.lock_name("3") == "gpu3.lock"


def test_the_visible_list_is_cut_to_what_cuda_counts(locks, monkeypatch):
    monkeypatch.setattr(launch, "machine_gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert launch.claimable_devices() == ["0", "1"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launch.claimable_devices() == ["0", "1"]


def test_no_claim_inside_a_slurm_job_even_with_visible_devices(locks, monkeypatch):
    monkeypatch.setattr(launch, "machine_gpu_count", lambda: 8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    with launch.visible_devices(2) as d:
        assert d is None and os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"  # Slurm's choice, kept
    assert not locks.exists()


# --------------------------------------------------------------------------- counting


@pytest.fixture
def fake_driver(monkeypatch, tmp_path):
    """An NVIDIA driver's control device, and `torch.cuda.device_count()` in the subprocess
    answered by a mock that records the CUDA_VISIBLE_DEVICES it ran under."""
    ctl = tmp_path / "nvidiactl"
    ctl.write_text("")
    monkeypatch.setattr(launch, "NVIDIA_CONTROL", ctl)
    monkeypatch.setattr(launch, "NVIDIA_GPUS", tmp_path / "no-proc-entries")
    calls = []

    def fake_run(cmd, env, **kwargs):
        calls.append(env.get("CUDA_VISIBLE_DEVICES"))
        assert cmd[1:3] == ["-c", "import torch; print(torch.cuda.device_count())"]
        visible = env.get("CUDA_VISIBLE_DEVICES")
        count = 4 if visible is None else len([v for v in visible.split(",") if v])
        return subprocess.CompletedProcess(cmd, 0, stdout=f"{count}\n", stderr="")

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    launch._cuda_count.cache_clear()
    yield calls
    launch._cuda_count.cache_clear()


def test_device_count_comes_from_cuda_in_a_subprocess(fake_driver, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    assert launch.cuda_device_count("1,3") == 2
    assert launch.machine_gpu_count() == 4  # asked with the variable unset, whatever this process has
    assert launch.usable_gpu_count() == 2
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launch.usable_gpu_count() == 4
    assert launch.claimable_devices() == ["0", "1", "2", "3"]
    assert fake_driver == ["1,3", None]  # cached: one subprocess per visible list
    import sys

    assert "torch.cuda" not in sys.modules or not __import__("torch").cuda.is_initialized()


def test_no_driver_means_no_subprocess(monkeypatch, tmp_path):
    monkeypatch.setattr(launch, "NVIDIA_CONTROL", tmp_path / "none")
    monkeypatch.setattr(launch, "NVIDIA_GPUS", tmp_path / "none-either")
    monkeypatch.setattr(launch.subprocess, "run", lambda *a, **k: pytest.fail("CUDA asked without a driver"))
    launch._cuda_count.cache_clear()
    assert launch.machine_gpu_count() == 0 and launch.usable_gpu_count({}) == 0


def test_a_failing_cuda_query_falls_back_to_the_drivers_entries(monkeypatch, tmp_path):
    proc = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (proc / bus).mkdir(parents=True)
    monkeypatch.setattr(launch, "NVIDIA_GPUS", proc)
    monkeypatch.setattr(
        launch.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, stdout="", stderr="boom")
    )
    launch._cuda_count.cache_clear()
    try:
        assert launch.machine_gpu_count() == 2
    finally:
        launch._cuda_count.cache_clear()


def test_a_slurm_submit_host_is_one_with_sbatch_outside_a_job_and_no_gpu(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: "/usr/bin/sbatch" if name == "sbatch" else None)
    monkeypatch.setattr(launch, "machine_gpu_count", lambda: 0)
    assert launch.slurm_submit_host({})
    assert not launch.slurm_submit_host({"SLURM_JOB_ID": "3"})
    monkeypatch.setattr(launch, "machine_gpu_count", lambda: 2)
    assert not launch.slurm_submit_host({})
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    monkeypatch.setattr(launch, "machine_gpu_count", lambda: 0)
    assert not launch.slurm_submit_host({})


# --------------------------------------------------------------------------- gpus: auto


def _config():
    from snakemake.utils import validate

    from llmret import checks

    c = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    checks.prefill(c)
    validate(c, str(ROOT / "src" / "llmret" / "config.schema.yaml"))
    return c


def test_gpus_auto_is_what_the_slurm_profile_says():
    """On a login node (no GPU) the profile's gpus_auto: 1 makes every auto a one-GPU job;
    unset, auto follows this machine; explicit counts are kept."""
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    c = _config()
    assert c["gpus_auto"] is None
    c["gpus_auto"] = profile["config"]["gpus_auto"]
    assert c["gpus_auto"] == 1
    c["finetuning"]["llara-ft-smollm2"]["gpus"] = 4
    resolved = plan.resolve_gpus(c, usable_gpus=0)
    assert c["pretraining"]["llara-smollm2"]["gpus"] == 1 and c["systems"]["smollm2-135m"]["gpus"] == 1
    assert c["finetuning"]["llara-ft-smollm2"]["gpus"] == 4 and "finetuning.llara-ft-smollm2.gpus" not in resolved
    assert "pretraining.llara-smollm2.gpus" in resolved and "systems.smollm2-135m.gpus" in resolved
    cpu = _config()
    cpu["gpus_auto"] = 0
    plan.resolve_gpus(cpu, usable_gpus=8)  # a CPU-only cluster: 0 whatever the login node has
    assert cpu["pretraining"]["llara-smollm2"]["gpus"] == 0


# --------------------------------------------------------------------------- DeepSpeed: auto


def test_deepspeed_auto_is_decided_by_the_gpus_in_one_function():
    assert deepspeed_config_for("auto", 8) == deepspeed_config_for("auto", 1) == GPU_DEEPSPEED_CONFIG
    assert deepspeed_config_for("auto", 0) == CPU_DEEPSPEED_CONFIG
    assert deepspeed_config_for(None, 8) == CPU_DEEPSPEED_CONFIG  # unset: the schema's default
    assert deepspeed_config_for("my/ds.json", 8) == "my/ds.json"
    for bad in ("auto", True, -1):
        with pytest.raises(ValueError, match="resolved GPU count"):
            deepspeed_config_for("auto", bad)
    for path in (CPU_DEEPSPEED_CONFIG, GPU_DEEPSPEED_CONFIG):
        assert (ROOT / path).is_file()


def test_the_default_config_trains_in_bf16_zero2_on_gpus_and_float32_on_cpus(tmp_path, monkeypatch):
    from llmret import sizing

    monkeypatch.chdir(ROOT)
    for usable, path, dtype in ((0, CPU_DEEPSPEED_CONFIG, "float32"), (2, GPU_DEEPSPEED_CONFIG, "bfloat16")):
        c = _config()
        plan.resolve_gpus(c, usable_gpus=usable)
        plan.resolve_training(c)
        for _, _, run in registry.runs(c):
            assert run["training"]["deepspeed_config"] == path
            assert sizing.training_dtype(run["training"], run["gpus"]) == dtype
            assert arguments.training_dtype(run["training"]).__repr__() == f"torch.{dtype}"
    # a run that names a file keeps it; the sizing reads its precision
    c = _config()
    c["pretraining"]["llara-smollm2"]["training"]["deepspeed_config"] = CPU_DEEPSPEED_CONFIG
    plan.resolve_gpus(c, usable_gpus=1)
    plan.resolve_training(c)
    training = c["pretraining"]["llara-smollm2"]["training"]
    assert training["deepspeed_config"] == CPU_DEEPSPEED_CONFIG and sizing.training_dtype(training, 1) == "float32"


def test_training_args_resolve_auto_by_this_process_gpus(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)  # the shipped files are found from the checkout
    args = arguments.TrainingArgs(output_dir="o", checkpoint_dir="c", deepspeed_config="auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert args.resolved_deepspeed_config == ROOT / CPU_DEEPSPEED_CONFIG and args.resolved_dtype == "float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert args.resolved_deepspeed_config == ROOT / GPU_DEEPSPEED_CONFIG
    assert arguments.deepspeed_config_path(None) == arguments.DEFAULT_DEEPSPEED_CONFIG
    assert arguments.deepspeed_config_path(str(tmp_path / "x.json")) == tmp_path / "x.json"


# --------------------------------------------------------------------------- global batch


def test_the_global_batch_must_be_the_one_intended():
    check_global_batch(None, 32, 1, 4)  # no check
    check_global_batch(256, 32, 1, 8)
    check_global_batch(256, 32, 2, 4)
    check_global_batch(8, 8, 1, 0)  # a CPU run is one rank
    with pytest.raises(ValueError) as e:
        check_global_batch(256, 32, 1, 4, where="pretraining.llara-llama2-7b.training")
    msg = str(e.value)
    assert "pretraining.llara-llama2-7b.training.global_batch_size is 256" in msg and "is 128" in msg
    assert "per_device_batch_size 32 x 4 GPUs (ranks) x gradient_accumulation_steps 1" in msg


def _preset_runs(name):
    preset = yaml.safe_load((ROOT / "config" / "presets" / name).read_text())
    return preset, {run: (stage.section, entry) for run, stage, entry in registry.runs(preset)}


@pytest.mark.parametrize(
    ("preset", "batches"),
    [
        ("llara-llama2-7b.yaml", {"llara-llama2-7b": 256, "base-ft-llama2-7b": 128, "llara-ft-llama2-7b": 128}),
        ("csplade-llama3-8b.yaml", {"adapt-llama31-8b": 256, "csplade-llama31-8b": 128}),
    ],
)
def test_presets_set_the_global_batch_and_four_gpus_are_refused(preset, batches):
    cfg, runs = _preset_runs(preset)
    for run, want in batches.items():
        section, entry = runs[run]
        assert entry["training"]["global_batch_size"] == want
        check_global_batch(
            want, entry["training"]["per_device_batch_size"], entry["training"].get("gradient_accumulation_steps", 1), 8
        )
    halved = copy.deepcopy(cfg)
    run = next(iter(batches))
    section, _ = runs[run]
    halved[section][run]["gpus"] = 4
    with pytest.raises(ValueError, match=rf"{section}\.{run}\.training\.global_batch_size"):
        plan.resolve_training(halved)


def test_the_loop_checks_the_global_batch_before_deepspeed_starts(tmp_path, monkeypatch):
    """At the start of training, with the ranks the job really has (WORLD_SIZE 1 here)."""
    from torch import nn

    from llmret.training import loop

    args = arguments.TrainingArgs(
        output_dir=str(tmp_path / "o"),
        checkpoint_dir=str(tmp_path / "c"),
        per_device_batch_size=4,
        gradient_accumulation_steps=2,
        global_batch_size=16,
    )
    with pytest.raises(ValueError, match="global_batch_size is 16 but the run's global batch is 8"):
        loop._plan(nn.Linear(2, 2), args, 10, rank=0, world_size=1, inputs=())
    assert not Path(args.checkpoint_dir).exists()
