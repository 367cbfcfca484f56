"""llmret.launch: one process, or several ranks under torchrun (CPU/gloo here)."""

import json
import os

import pytest
from conftest import tiny_llama_config

from llmret import launch, registry
from llmret.llara import pretraining
from llmret.llara.shard_dataset import write_manifest

SENTENCES = [
    "Cats purr when they are happy and warm. Dogs bark at the postman every single morning.",
    "The river floods the valley each spring. Farmers plant rice once the water finally recedes.",
    "A small lamp lit the narrow room at night. Outside, the snow kept falling on the town.",
    "She tuned the old violin by ear that day. The concert began an hour later in the hall.",
    "Bees visit the clover in the warm field. Honey fills the comb by the end of summer.",
    "The train left the station before dawn today. Passengers slept until the mountains came.",
    "A baker rises early to light the oven. Bread cools on racks by the shop window.",
    "Waves broke over the harbour wall at noon. Fishermen tied their boats to the pier.",
]


def test_command_is_an_argument_list_without_a_shell(tmp_path):
    cmd = launch.torchrun_command("pretraining", tmp_path / "a b.json", 4)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc-per-node=4" in cmd and cmd[-3:] == ["llmret.launch", "pretraining", str(tmp_path / "a b.json")]


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="unknown training stage 'os.system'"):
        launch.run("os.system", {}, nproc=1)


@pytest.fixture
def tiny_llara_inputs(tmp_path, smollm2_dir):
    """A tiny random Llama with SmolLM2's tokenizer, and one shard of pairs with its manifest."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = tiny_llama_config(len(tok), tie_word_embeddings=True)
    model_dir = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(SENTENCES)))
    spec = pretraining.PretrainSpec(shards=1, max_text_length=16, min_words=4)
    shard = tmp_path / "shards" / "shard-0.safetensors"
    pretraining.make_shard([str(corpus)], str(model_dir), 0, spec, str(shard))
    write_manifest([shard], tmp_path / "shards" / "manifest.json")
    return model_dir, tmp_path / "shards" / "manifest.json", spec


@pytest.mark.slow
def test_two_ranks_under_torchrun_train_one_model(tmp_path, tiny_llara_inputs, monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model_dir, manifest, spec = tiny_llara_inputs
    out = tmp_path / "out"
    training = {
        "max_steps": 2,
        "per_device_batch_size": 2,
        "learning_rate": 1e-3,
        "save_every": 1,
        "log_every": 1,
        "log_path": str(tmp_path / "log.jsonl"),
    }
    launch.run(
        "pretraining",
        {
            "model_dir": str(model_dir),
            "manifest": str(manifest),
            "spec": {"shards": 1, "max_text_length": 16, "min_words": 4},
            "training": training,
            "out_dir": str(out),
            "checkpoint_dir": str(tmp_path / "ckpt"),
        },
        nproc=2,
    )
    state = json.loads((out / "training_state.json").read_text())
    assert state["world_size"] == 2 and state["steps"] == 2
    assert state["peak_memory_mb"]["host_rss_mb"] > 100  # the max over ranks; each imports torch and transformers
    # two ranks x 2 sequences per step: the global batch the DeepSpeed config was given
    assert state["deepspeed_config"]["train_batch_size"] == 4
    assert (out / "model.safetensors").is_file()
    start = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 2
    assert not os.environ.get("LOCAL_RANK")  # the parent process was never a rank


# GPU claims for local runs: Snakemake gives a local job no devices of its own.


@pytest.fixture
def no_visible_devices(monkeypatch, tmp_path):
    """CUDA_VISIBLE_DEVICES unset (as under a local Snakemake run), outside Slurm, locks in a temp folder;
    the variable is put back as it was afterwards."""
    saved = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # claims are skipped inside a Slurm job
    monkeypatch.setenv(launch.LOCK_DIR_ENV, str(tmp_path / "locks"))
    yield tmp_path / "locks"
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    if saved is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = saved


def test_concurrent_claims_get_disjoint_gpus(no_visible_devices):
    three = ["0", "1", "2"]
    with launch.claimed_devices(2, devices=three) as first:
        assert first == ["0", "1"]
        with launch.claimed_devices(1, devices=three) as second:
            assert second == ["2"]
            with pytest.raises(TimeoutError, match="1 of 3 GPUs not free"):
                with launch.claimed_devices(1, devices=three, poll_s=0.01, timeout_s=0.05):
                    pass
    with launch.claimed_devices(3, devices=three) as all_three:
        assert all_three == three
    assert sorted(p.name for p in no_visible_devices.iterdir()) == ["gpu0.lock", "gpu1.lock", "gpu2.lock"]


def test_a_killed_holder_frees_its_gpu(no_visible_devices):
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom llmret import launch\n"
            "with launch.claimed_devices(1, devices=['0', '1']) as d:\n"
            "    print(d, flush=True)\n    time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "['0']"
        with launch.claimed_devices(1, devices=["0", "1"]) as d:
            assert d == ["1"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with launch.claimed_devices(2, devices=["0", "1"]) as d:
        assert d == ["0", "1"]


def test_no_claim_under_a_scheduler_or_without_gpus(no_visible_devices, monkeypatch):
    with launch.claimed_devices(1, devices=[]) as d:
        assert d is None
    with pytest.raises(ValueError, match="asks for 4 GPUs; only 2 are visible here"):
        with launch.claimed_devices(4, devices=["0", "1"]):
            pass
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # Slurm gave the job its GPUs
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with launch.claimed_devices(1, devices=["3"]) as d:
        assert d is None


def test_run_sets_the_claimed_devices_for_the_stage(no_visible_devices, monkeypatch):
    monkeypatch.setattr(launch, "machine_gpu_count", lambda: 2)
    # a stage whose entry point returns the variable it is asked for
    monkeypatch.setitem(registry.STAGES, "probe", registry.Stage("probe", spec="", entry="os:getenv", data=None))
    with launch.claimed_devices(1):  # another job holds GPU 0
        assert launch.run("probe", {"key": "CUDA_VISIBLE_DEVICES"}, nproc=1) == "1"
