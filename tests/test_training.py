"""The DeepSpeed training loop on CPU: learning, logs, checkpoints, and resumption after SIGKILL.

Tiny models only: a dropout MLP regressor (``forward(batch)`` with a dataclass batch, like
:class:`llmret.llara.objective.JointBatch`) and a 2-layer ``LlamaForCausalLM`` (dict batches, HF save).

This file doubles as the training script of the kill/resume test:
``python tests/test_training.py OUT_DIR`` trains the regressor into ``OUT_DIR``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import LAUNCHER_VARS, tiny_llama_config
from torch import nn
from torch.utils.data import Dataset

from llmret.llara.modeling import save_llara
from llmret.training import arguments, checkpointing
from llmret.training.arguments import (
    TrainingArgs,
    build_deepspeed_config,
    input_digest,
    lr_factor,
    recipe,
    recipe_changes,
    training_dtype,
)
from llmret.training.checkpointing import (
    LATEST,
    TRAINER_STATE,
    checkpoints_to_keep,
    prune_checkpoints,
    safe_torch_load,
)
from llmret.training.distributed import merge_peaks
from llmret.training.loop import train
from llmret.training.sampling import ResumableBatchSampler, epoch_batches

pytestmark = pytest.mark.usefixtures("one_thread", "clean_process_state")

ROOT = Path(__file__).resolve().parents[1]
STEP_FIELDS = {"step", "loss", "loss_mse", "loss_l1", "lr", "tokens_per_s", "elapsed_s"}


# --------------------------------------------------------------------------- tiny task


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor

    def to(self, device):
        return Batch(self.x.to(device), self.y.to(device))


class Regressor(nn.Module):
    """Dropout on purpose: resumption must replay the random masks too."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 1))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        err = self.net(batch.x).squeeze(-1) - batch.y
        mse, l1 = (err**2).mean(), err.abs().mean()
        return {"loss": mse + 0.1 * l1, "loss_mse": mse, "loss_l1": l1, "pred_std": err.std()}


class Pairs(Dataset):
    def __init__(self, n: int = 64, dim: int = 8):
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, generator=g) / dim**0.5 + 0.05 * torch.randn(n, generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class Tripwire:
    """Leaves a file behind if it is ever unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __setstate__(self, state):
        Path(state["path"]).write_text("unpickled")


def collate(items) -> Batch:
    return Batch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))


def save_regressor(model: nn.Module, out_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))


def count_rows(batch: Batch) -> int:
    return int(batch.x.shape[0])


def regressor_args(root: Path, **over) -> TrainingArgs:
    kw = dict(
        output_dir=str(root / "final"),
        checkpoint_dir=str(root / "ckpt"),
        max_steps=20,
        per_device_batch_size=4,
        gradient_accumulation_steps=2,  # 8 micro-batches per epoch: 20 steps cross 5 epochs
        learning_rate=3e-2,
        warmup_steps=3,
        weight_decay=0.01,
        lr_scheduler="linear",
        save_every=5,
        log_every=1,
        seed=7,
        max_grad_norm=1.0,
    )
    kw.update(over)
    return TrainingArgs(**kw)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _steps(records: list[dict]) -> dict[int, dict]:
    """Last record per step (a resumed run logs the replayed steps again)."""
    return {r["step"]: r for r in records if r.get("event") == "step"}


# --------------------------------------------------------------------------- script mode


def _script(out_root: str) -> None:
    """Deterministic single-thread run; with HANG_ONCE_AFTER=N, the first process to reach
    collate call N+1 blocks there forever (once per out_root) so the test can SIGKILL it at a
    known point: after step 12 was trained and logged, but after the step-10 checkpoint only."""
    torch.set_num_threads(1)
    root = Path(out_root)
    hang_after = int(os.environ.get("HANG_ONCE_AFTER", "0"))
    flag = root / "hung-once"
    calls = 0

    def collate_maybe_hang(items):
        nonlocal calls
        calls += 1
        if hang_after and calls > hang_after and not flag.exists():
            flag.write_text(str(calls))
            while True:
                time.sleep(1)
        return collate(items)

    torch.manual_seed(0)
    model = Regressor()
    train(
        model,
        Pairs(),
        collate_maybe_hang,
        regressor_args(root, deterministic=True),
        save_fn=save_regressor,
        count_tokens=count_rows,
    )


# --------------------------------------------------------------------------- fixtures


def _launch(out_root: Path, hang_after: int = 0) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}  # this process may hold a port
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("HANG_ONCE_AFTER", None)
    if hang_after:
        env["HANG_ONCE_AFTER"] = str(hang_after)
    out_root.mkdir(parents=True, exist_ok=True)
    with open(out_root / "console.txt", "ab") as console:  # the child keeps its own descriptor
        cmd = [sys.executable, __file__, str(out_root)]
        return subprocess.Popen(cmd, env=env, stdout=console, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait(proc: subprocess.Popen, out_root: Path, timeout: float = 300) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    if rc != 0:
        raise AssertionError(f"run in {out_root} ended with {rc}:\n{(out_root / 'console.txt').read_text()[-4000:]}")


# --------------------------------------------------------------------------- pure functions


def test_peak_memory_is_the_max_over_attempts():
    assert merge_peaks({"host_rss_mb": 500.0}, None) == {"host_rss_mb": 500.0}
    # a resume that trains nothing keeps the first attempt's peak; a larger new peak wins
    assert merge_peaks({"host_rss_mb": 500.0}, {"host_rss_mb": 1800.0}) == {"host_rss_mb": 1800.0}
    assert merge_peaks({"host_rss_mb": 2000.0, "device_allocated_mb": 3.0}, {"host_rss_mb": 1800.0}) == {
        "host_rss_mb": 2000.0,
        "device_allocated_mb": 3.0,
    }


def test_lr_schedules():
    assert [lr_factor(s, "constant", 4, 20) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(4, "linear", 4, 20) == 1.0 and lr_factor(12, "linear", 4, 20) == 0.5
    assert 0 < lr_factor(19, "linear", 4, 20) < 0.1
    assert lr_factor(12, "cosine", 4, 20) == pytest.approx(0.5)
    assert lr_factor(0, "cosine", 0, 20) == 1.0
    with pytest.raises(ValueError):
        lr_factor(0, "exp", 0, 10)


def test_batch_order_is_deterministic_partitioned_and_resumable():
    n, bs = 23, 2
    a, b = epoch_batches(n, bs, seed=3, epoch=0), epoch_batches(n, bs, seed=3, epoch=0)
    assert a == b and len(a) == 11 and all(len(x) == bs for x in a)
    assert epoch_batches(n, bs, seed=3, epoch=1) != a  # reshuffled each epoch
    ranks = [sum(epoch_batches(n, bs, 3, 0, rank=r, world_size=2), []) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 10 and not set(ranks[0]) & set(ranks[1])

    def take(sampler, k):
        it = iter(sampler)
        return [next(it) for _ in range(k)]

    full = take(ResumableBatchSampler(n, bs, 3), 40)  # crosses three epoch boundaries
    for start in (0, 5, 11, 17, 33):
        assert take(ResumableBatchSampler(n, bs, 3, start=start), 40 - start) == full[start:]


def test_deepspeed_config_is_filled_from_args(tmp_path):
    args = regressor_args(tmp_path, max_grad_norm=0.5)
    cfg = build_deepspeed_config(args, world_size=3)
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["train_batch_size"] == 24 and cfg["gradient_clipping"] == 0.5
    assert cfg["optimizer"]["params"]["lr"] == 3e-2 and cfg["optimizer"]["params"]["torch_adam"] is True
    bad = tmp_path / "bad.json"
    for extra in (
        {"train_micro_batch_size_per_gpu": 16},
        {"scheduler": {"type": "WarmupLR"}},
        {"zero_optimization": {"stage": 3}},
    ):
        bad.write_text(json.dumps(extra))
        with pytest.raises((ValueError, NotImplementedError)):
            build_deepspeed_config(regressor_args(tmp_path, deepspeed_config=str(bad)), 1)
    gpu = ROOT / "config" / "deepspeed" / "gpu_zero2_bf16.json"
    cfg = build_deepspeed_config(regressor_args(tmp_path, deepspeed_config=str(gpu)), 8)
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["bf16"]["enabled"] and cfg["train_batch_size"] == 64


# --------------------------------------------------------------------------- DeepSpeed runs


def _proc_status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (kB) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / 1e6
    raise KeyError(field)


@pytest.mark.slow
def test_regressor_learns_logs_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    rss_before = _proc_status_mb("VmRSS")
    result = train(
        Regressor(), Pairs(), collate, regressor_args(tmp_path), save_fn=save_regressor, count_tokens=count_rows
    )

    records = _records(tmp_path / "ckpt" / "train_log.jsonl")
    assert records[0]["event"] == "start" and records[0]["step"] == 0 and records[0]["safe_loading"] is True
    steps = _steps(records)
    assert sorted(steps) == list(range(1, 21))
    for r in steps.values():
        assert STEP_FIELDS <= set(r) and "pred_std" not in r  # only loss_* scalars
        assert r["tokens_per_s"] > 0 and r["elapsed_s"] > 0
    first = sum(steps[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(steps[s]["loss"] for s in (18, 19, 20)) / 3
    assert last < 0.5 * first, (first, last)
    assert [steps[s]["lr"] for s in (1, 2, 3)] == pytest.approx([1e-2, 2e-2, 3e-2])  # warmup
    assert steps[20]["lr"] < steps[10]["lr"] < steps[4]["lr"]  # linear decay

    ckpt = tmp_path / "ckpt"
    assert (ckpt / LATEST).read_text() == "step20"
    # The last save keeps only itself: step 15 served only while step 20 was not yet written.
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step20"]
    assert json.loads((ckpt / "step20" / "trainer_state.json").read_text())["data"]["micro_batches_consumed"] == 40
    for f in (ckpt / "step20").glob("*.pt"):  # our pickles load with weights_only=True
        assert "module" in safe_torch_load(f, map_location="cpu")

    final = tmp_path / "final"
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "training_state.json"]
    state = json.loads((final / "training_state.json").read_text())
    assert state["steps"] == 20 and state["final_loss"] == steps[20]["loss"] and state["resumed_from_step"] is None
    assert state["args"]["seed"] == 7 and state["deepspeed_config"]["train_batch_size"] == 8
    assert result["final_loss"] == state["final_loss"]
    assert not list(tmp_path.glob(".final.*"))  # no temp folders left
    # Peak memory is the process's high-water mark, in MB: at least what it held before
    # training, at most the kernel's high-water mark now; no device figures on CPU.
    peak = state["peak_memory_mb"]
    assert state["device"] == "cpu" and set(peak) == {"host_rss_mb"}
    assert rss_before * 0.99 <= peak["host_rss_mb"] <= _proc_status_mb("VmHWM") * 1.01

    with pytest.raises(ValueError, match="batch order changed"):  # refused before DeepSpeed starts
        train(Regressor(), Pairs(), collate, regressor_args(tmp_path, per_device_batch_size=8), save_fn=save_regressor)

    # Resuming reads DeepSpeed's pickles with weights_only=True: a foreign class is refused, not run.
    states = ckpt / "step20" / "mp_rank_00_model_states.pt"
    sd = safe_torch_load(states)
    sd["tripwire"] = Tripwire(tmp_path / "tripped")
    torch.save(sd, states)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        train(Regressor(), Pairs(), collate, regressor_args(tmp_path), save_fn=save_regressor)
    assert not (tmp_path / "tripped").exists()


@pytest.mark.slow
def test_changed_settings_train_afresh_instead_of_resuming_a_stale_checkpoint(tmp_path):
    """Rerunning a stage after a setting changed (here the learning rate) must give the model of
    the new settings, not resume the old run's final checkpoint; logging and saving cadence
    are not settings of the model, so changing them still resumes."""
    from safetensors.torch import load_file

    def run(root: Path, inputs=(), **over) -> dict:
        torch.manual_seed(0)  # the same initial weights in every run
        args = regressor_args(root, **{"max_steps": 6, "save_every": 3, **over})
        return train(Regressor(), Pairs(), collate, args, save_fn=save_regressor, inputs=inputs)

    run(tmp_path / "a")
    changed = run(tmp_path / "a", learning_rate=1e-2)
    assert changed["resumed_from_step"] is None and changed["steps"] == 6
    # The fresh start begins a new log: the old run's six steps are not this run's.
    records = _records(tmp_path / "a" / "ckpt" / "train_log.jsonl")
    assert [(r["event"], r["step"]) for r in records if r["event"] != "step"] == [("start", 0)]
    assert [r["step"] for r in records if r["event"] == "step"] == list(range(1, 7))
    assert max(r["lr"] for r in records if r["event"] == "step") == pytest.approx(1e-2)
    run(tmp_path / "fresh", learning_rate=1e-2)
    got, fresh = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("a", "fresh"))
    assert all(torch.equal(got[k], fresh[k]) for k in fresh)
    state = json.loads((tmp_path / "a" / "ckpt" / "step6" / "trainer_state.json").read_text())
    assert state["recipe"]["learning_rate"] == 1e-2
    assert run(tmp_path / "a", learning_rate=1e-2, save_every=2, log_every=3)["resumed_from_step"] == 6
    events = [r for r in _records(tmp_path / "a" / "ckpt" / "train_log.jsonl") if r["event"] != "step"]
    assert [(r["event"], r["step"]) for r in events] == [("start", 0), ("resume", 6)]  # a resume appends

    # The inputs (base model, training data) are part of the recipe, by content: the same
    # negatives elsewhere resume, re-mined negatives of the same length start afresh.
    data, moved = tmp_path / "negatives.jsonl", tmp_path / "elsewhere" / "negatives.jsonl"
    data.write_text('{"query_id": "1"}\n')
    moved.parent.mkdir()
    moved.write_text(data.read_text())
    assert run(tmp_path / "b", inputs=(data,))["resumed_from_step"] is None
    assert run(tmp_path / "b", inputs=(moved,))["resumed_from_step"] == 6
    data.write_text('{"query_id": "2"}\n')
    assert run(tmp_path / "b", inputs=(data,))["resumed_from_step"] is None


def test_prune_keeps_the_newest_tags_up_to_latest(tmp_path):
    """During training the tag before ``latest`` stays as a fallback; tags above ``latest``
    (a save killed before its marker) and older ones go; the last save keeps only itself."""
    for s in (5, 10, 15, 20):
        (tmp_path / f"step{s}").mkdir()
    (tmp_path / "notes").mkdir()
    prune_checkpoints(tmp_path, "step15")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step10", "step15"]
    prune_checkpoints(tmp_path, "step15", keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step15"]


@pytest.mark.parametrize("keep", [1, 2, 3, 9])
def test_prune_keeps_exactly_n(tmp_path, keep):
    steps = (5, 10, 15, 20, 25, 30)
    for s in steps:
        (tmp_path / f"step{s}").mkdir()
    prune_checkpoints(tmp_path, "step25", keep_last=keep)  # step30: a save killed before its marker
    assert sorted(int(p.name[4:]) for p in tmp_path.iterdir()) == [5, 10, 15, 20, 25][-keep:]
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(tmp_path, "step25", keep_last=0)


def test_retention_default_is_one_for_full_parameter_runs_and_two_with_frozen_parameters():
    full, lora = Regressor(), Regressor()
    lora.net[0].weight.requires_grad_(False)
    assert checkpoints_to_keep(None, full) == 1 and checkpoints_to_keep(None, lora) == 2
    assert checkpoints_to_keep(3, full) == checkpoints_to_keep(3, lora) == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="keep_checkpoints"):
            regressor_args(Path("/unused"), keep_checkpoints=bad)


@pytest.mark.slow
@pytest.mark.parametrize(("keep", "during"), [(None, [1, 1, 1, 1, 1]), (3, [1, 2, 3, 3, 3])])
def test_the_loop_keeps_keep_checkpoints_while_training(tmp_path, monkeypatch, keep, during):
    """The tags left after each save: ``keep_checkpoints`` (default 1: every parameter of the
    regressor trains) while training, only the last one after the final save."""
    left = []

    def prune(checkpoint_dir, latest, keep_last=2):
        prune_checkpoints(checkpoint_dir, latest, keep_last)
        left.append(sorted(p.name for p in checkpoint_dir.iterdir() if p.name.startswith("step")))

    monkeypatch.setattr(checkpointing, "prune_checkpoints", prune)
    torch.manual_seed(0)
    args = regressor_args(tmp_path, max_steps=6, save_every=1, keep_checkpoints=keep)
    train(Regressor(), Pairs(), collate, args, save_fn=save_regressor)
    assert [len(tags) for tags in left] == [*during, 1]
    assert left[-1] == ["step6"] and left[-2][-1] == "step5"


def test_dtype_agrees_with_the_deepspeed_config(tmp_path, monkeypatch):
    cpu, gpu = (str(ROOT / "config" / "deepspeed" / f) for f in ("cpu.json", "gpu_zero2_bf16.json"))
    assert regressor_args(tmp_path).resolved_dtype == "float32"  # auto under cpu.json: bit-identical CPU runs
    assert regressor_args(tmp_path, deepspeed_config=gpu).torch_dtype == torch.bfloat16
    assert training_dtype({}) == torch.float32 and training_dtype({"deepspeed_config": gpu}) == torch.bfloat16
    with pytest.raises(ValueError, match=r"training.dtype is bfloat16 but .*cpu.json computes in float32"):
        build_deepspeed_config(regressor_args(tmp_path, dtype="bfloat16", deepspeed_config=cpu), 1)
    with pytest.raises(ValueError, match=r"training.dtype is float32 but .*computes in bfloat16"):
        training_dtype({"dtype": "float32", "deepspeed_config": gpu})
    with pytest.raises(ValueError, match="dtype must be one of"):
        regressor_args(tmp_path, dtype="fp8")

    # A config that leaves the precision open is filled in from the dtype; auto is bf16 only
    # on a CUDA device with bf16.
    open_json = tmp_path / "open.json"
    open_json.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}))

    def filled(**over):
        cfg = build_deepspeed_config(regressor_args(tmp_path, deepspeed_config=str(open_json), **over), 1)
        return cfg["bf16"]["enabled"], cfg["fp16"]["enabled"]

    assert filled() == (False, False)
    assert filled(dtype="bfloat16") == (True, False) and filled(dtype="float16") == (False, True)
    monkeypatch.setattr(arguments, "cuda_bf16", lambda: True)
    assert filled() == (True, False)
    assert regressor_args(tmp_path, deepspeed_config=cpu).resolved_dtype == "float32"  # the JSON still decides
    both = tmp_path / "both.json"
    both.write_text(json.dumps({"bf16": {"enabled": True}, "fp16": {"enabled": True}}))
    with pytest.raises(ValueError, match="both enabled"):
        training_dtype({"deepspeed_config": str(both)})


@pytest.mark.slow
def test_bf16_run_with_the_gpu_preset_config_and_refused_mismatches(tmp_path):
    """ZeRO-2 + bf16 (config/deepspeed/gpu_zero2_bf16.json) trains on CPU too: the model is
    given in bfloat16 and stays so. A model in another dtype than the run's is refused
    before DeepSpeed starts (it would cast a float32 copy, or refuse bf16 under fp32)."""
    gpu = str(ROOT / "config" / "deepspeed" / "gpu_zero2_bf16.json")

    def bf16(items):
        batch = collate(items)
        return Batch(batch.x.bfloat16(), batch.y.bfloat16())

    torch.manual_seed(0)
    model = Regressor().to(torch.bfloat16)
    args = regressor_args(tmp_path, deepspeed_config=gpu, max_steps=4, save_every=2)
    result = train(model, Pairs(), bf16, args, save_fn=save_regressor)
    assert result["dtype"] == "bfloat16" and result["deepspeed_config"]["bf16"]["enabled"]
    assert math.isfinite(result["final_loss"]) and all(p.dtype == torch.bfloat16 for p in model.parameters())
    with pytest.raises(ValueError, match=r"computes in bfloat16 .* e.g. net.0.weight in torch.float32"):
        train(Regressor(), Pairs(), bf16, regressor_args(tmp_path / "b", deepspeed_config=gpu), save_fn=save_regressor)
    with pytest.raises(ValueError, match="computes in float32"):
        train(Regressor().bfloat16(), Pairs(), collate, regressor_args(tmp_path / "c"), save_fn=save_regressor)


# The load measured in a fresh process: warmed up first (the model classes' imports, torch's
# ops, PEFT), so the resident-set high-water mark it prints grows by the load alone.
LOAD_SCRIPT = """
import json, resource, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from llmret.csplade.adaptation import load_causal_lora
from llmret.training.arguments import training_dtype
from llmret.training.lora import LoraSpec, apply_lora

model_dir, deepspeed_config = sys.argv[1:3]
cfg = AutoConfig.from_pretrained(model_dir)
cfg.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=128))
warm = apply_lora(AutoModelForCausalLM.from_config(cfg), LoraSpec())
float(sum(p.detach().flatten()[::1024].float().sum() for p in warm.parameters()))
del warm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model = load_causal_lora(model_dir, LoraSpec(), dtype=training_dtype({"deepspeed_config": deepspeed_config}))
float(sum(p.detach().flatten()[::1024].float().sum() for p in model.parameters()))  # every page read
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024  # KiB on Linux
base = [p for p in model.parameters() if not p.requires_grad]
print(json.dumps({
    "grown": grown,
    "base_dtypes": sorted({str(p.dtype) for p in base}),
    "base_numel": sum(p.numel() for p in base),
    "base_bytes": sum(p.numel() * p.element_size() for p in base),
}))
"""


@pytest.fixture(scope="module")
def smollm2_bf16_dir(smollm2_dir) -> Path:
    """SmolLM2 stored in bfloat16 (made once per machine beside the imported copy), as a 7B
    base model is best imported: loading an fp32 file in bf16 reads the whole file through
    its memory map, whose pages the resident set counts too (page cache, shared by ranks)."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    out = smollm2_dir.parent / "smollm2-135m-bf16"
    if not (out / "model.safetensors").is_file():
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
            weights = {k: f.get_tensor(k).bfloat16() for k in f.keys()}
            metadata = f.metadata()
        save_file(weights, tmp / "model.safetensors", metadata=metadata)
        config = json.loads((smollm2_dir / "config.json").read_text())
        (tmp / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


@pytest.mark.slow
def test_bf16_run_loads_the_model_in_bf16_without_a_float32_copy(smollm2_bf16_dir):
    """A stage's load under the GPU preset's DeepSpeed config (dtype auto -> bfloat16) creates
    the base model in bfloat16: half the float32 bytes, and the load's peak resident-set growth
    stays well below the float32 size (loading float32 and casting peaks at ~1.4x of it)."""
    gpu = ROOT / "config" / "deepspeed" / "gpu_zero2_bf16.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(smollm2_bf16_dir), str(gpu)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    fp32_bytes = 4 * got["base_numel"]
    assert got["base_dtypes"] == ["torch.bfloat16"] and got["base_bytes"] * 2 == fp32_bytes
    assert got["grown"] < 0.75 * fp32_bytes, (got["grown"] / 1e6, fp32_bytes / 1e6)


def test_input_digest_is_by_content_and_names_within_a_folder(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for root in (a, b):
        (root / "sub").mkdir(parents=True)
        (root / "config.json").write_text("{}")
        (root / "sub" / "model.safetensors").write_bytes(b"weights")
    assert input_digest(a) == input_digest(b) != input_digest(a / "config.json")
    assert input_digest(a / "config.json") == hashlib.sha256(b"{}").hexdigest()
    (b / "sub" / "model.safetensors").write_bytes(b"weightz")
    assert input_digest(a) != input_digest(b)
    (b / "sub" / "model.safetensors").write_bytes(b"weights")
    (b / "sub" / "model.safetensors").rename(b / "sub" / "other.safetensors")
    assert input_digest(a) != input_digest(b)
    with pytest.raises(FileNotFoundError, match="missing"):
        input_digest(tmp_path / "missing")


def test_recipe_holds_the_models_settings():
    from llmret.csplade.adaptation import AdaptationSpec

    class Staged(nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.spec = spec

    args = regressor_args(Path("/unused"))
    a, b = recipe(args, Staged(AdaptationSpec())), recipe(args, Staged(AdaptationSpec(scale_weight=0.5)))
    assert a["spec"]["scale_weight"] == 0.0 and a["learning_rate"] == args.learning_rate
    assert set(recipe_changes(a, b)) == {"spec"}
    assert recipe_changes(None, b) == {}  # a checkpoint from before recipes were recorded resumes
    assert recipe_changes(a, {**a, "inputs": ["0" * 64]}) == {}  # nor before inputs were
    assert recipe_changes({**a, "inputs": ["0" * 64]}, {**a, "inputs": ["1" * 64]}) == {
        "inputs": (["0" * 64], ["1" * 64])
    }
    constant = regressor_args(Path("/unused"), lr_scheduler="constant")
    assert "max_steps" not in recipe(constant, Regressor())  # extending a constant-rate run resumes
    assert recipe(args, Regressor()) == {
        **{
            k: getattr(args, k)
            for k in ("max_steps", "learning_rate", "warmup_steps", "weight_decay", "lr_scheduler", "max_grad_norm")
        },
        "dtype": "float32",  # resolved: cpu.json computes in float32
    }


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    """SIGKILL a run after step 12 (checkpoint: step 10), rerun the same command, and compare
    with an uninterrupted run: the final weights must be bit-identical (torch.equal)."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    gas = 2
    first = _launch(killed, hang_after=12 * gas)  # hangs fetching step 13's first micro-batch
    reference = _launch(clean)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            logged = _steps(_records(killed / "ckpt" / "train_log.jsonl"))
            marker = killed / "ckpt" / LATEST
            if 12 in logged and marker.exists() and (killed / "hung-once").exists():
                break
            if first.poll() is not None:
                raise AssertionError(f"first run ended early:\n{(killed / 'console.txt').read_text()[-4000:]}")
            time.sleep(0.05)
        else:
            raise AssertionError(f"step 12 never logged:\n{(killed / 'console.txt').read_text()[-4000:]}")
        assert marker.read_text() == "step10" and not (killed / "final").exists()
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
    killed_peak = json.loads((killed / "ckpt" / "step10" / TRAINER_STATE).read_text())["peak_memory_mb"]
    second = _launch(killed)  # the same command and environment
    _wait(second, killed)
    _wait(reference, clean)

    records = _records(killed / "ckpt" / "train_log.jsonl")
    events = [r for r in records if r.get("event") in ("start", "resume")]
    assert [(e["event"], e["step"]) for e in events] == [("start", 0), ("resume", 10)]
    first_run_steps = [r["step"] for r in records[: records.index(events[1])] if r.get("event") == "step"]
    assert first_run_steps == list(range(1, 13))  # steps 11 and 12 were lost and redone
    assert [r["step"] for r in records[records.index(events[1]) :] if r.get("event") == "step"] == list(range(11, 21))
    state = json.loads((killed / "final" / "training_state.json").read_text())
    assert state["resumed_from_step"] == 10 and state["steps"] == 20
    assert state["peak_memory_mb"]["host_rss_mb"] >= killed_peak["host_rss_mb"] > 0  # over both attempts
    assert sorted(p.name for p in (killed / "ckpt").iterdir() if p.is_dir()) == ["step20"]

    # Same losses step by step, and the same weights bit for bit.
    a, b = _steps(records), _steps(_records(clean / "ckpt" / "train_log.jsonl"))
    for s in range(1, 21):
        assert a[s]["loss"] == b[s]["loss"] and a[s]["lr"] == b[s]["lr"], s
    from safetensors.torch import load_file

    wa, wb = load_file(killed / "final" / "model.safetensors"), load_file(clean / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) == 4
    for k in wa:
        assert torch.equal(wa[k], wb[k]), (k, (wa[k] - wb[k]).abs().max())
    torch.manual_seed(0)
    init = Regressor().state_dict()
    assert not torch.equal(init["net.0.weight"], wa["net.0.weight"])  # it did train


# --------------------------------------------------------------------------- HF models


def _tiny_llama(seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(max_position_embeddings=64, attn_implementation="eager"))


class Tokens(Dataset):
    def __init__(self, n: int = 32, length: int = 12):
        g = torch.Generator().manual_seed(5)
        base = torch.randint(3, 128, (4, length), generator=g)
        self.rows = base[torch.arange(n) % 4]  # four repeated sequences: easy to learn

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def collate_lm(rows) -> dict[str, torch.Tensor]:
    ids = torch.stack(rows)
    ids[-1, -3:] = 0  # some padding, not counted as tokens
    labels = ids.masked_fill(ids == 0, -100)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


class StubTokenizer:
    def save_pretrained(self, out_dir):
        (Path(out_dir) / "tokenizer_config.json").write_text("{}")


@pytest.mark.slow
def test_tiny_llama_with_hf_save_and_gradient_checkpointing(tmp_path):
    from safetensors.torch import load_file

    from llmret.training.loop import nonpad_token_counter

    model = _tiny_llama()
    args = TrainingArgs(
        output_dir=str(tmp_path / "final"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        max_steps=12,
        per_device_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler="cosine",
        save_every=4,
        log_every=4,
        gradient_checkpointing=True,
        log_path=str(tmp_path / "log.jsonl"),
    )
    train(model, Tokens(), collate_lm, args, tokenizer=StubTokenizer(), count_tokens=nonpad_token_counter(0))
    assert model.model.layers[0].gradient_checkpointing
    steps = _steps(_records(tmp_path / "log.jsonl"))
    assert sorted(steps) == [4, 8, 12] and steps[12]["loss"] < steps[4]["loss"]
    assert set(steps[4]) == {"event", "step", "loss", "lr", "tokens_per_s", "elapsed_s"}
    final = tmp_path / "final"
    names = sorted(p.name for p in final.iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer_config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    saved = load_file(final / "model.safetensors")
    live = model.state_dict()
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == ["step12"]

    # Rerunning a finished run loads step 12, trains nothing and rewrites the same model.
    again = train(_tiny_llama(seed=1), Tokens(), collate_lm, args, count_tokens=nonpad_token_counter(0))
    assert again["resumed_from_step"] == 12 and again["final_loss"] == steps[12]["loss"]
    resaved = load_file(final / "model.safetensors")
    assert all(torch.equal(saved[k], resaved[k]) for k in saved)


def test_save_llara_writes_lm_and_head_as_safetensors(tmp_path):
    from safetensors.torch import load_file

    from llmret.llara.modeling import LlaraModel

    model = LlaraModel(_tiny_llama(), head="copy")
    with torch.no_grad():
        model.projection.weight.add_(1.0)  # now differs from the LM head
    save_llara(model, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert {"model.safetensors", "projection.safetensors", "llara.json", "config.json"} <= set(names)
    assert torch.equal(load_file(tmp_path / "projection.safetensors")["weight"], model.projection.weight)
    assert json.loads((tmp_path / "llara.json").read_text())["head"] == "copy"


PAIRS = [
    ("Cats purr when they are happy and warm.", "Dogs bark at the postman every morning."),
    ("The river floods the valley each spring.", "Farmers plant rice once the water recedes."),
    ("A small lamp lit the narrow room.", "Outside, the snow kept falling all night."),
    ("She tuned the old violin by ear.", "The concert began an hour later."),
]


@pytest.mark.slow
def test_llara_model_trains_end_to_end(tmp_path, smollm2_dir):
    """LlaraModel over a tiny random Llama, real tokenizer and JointBatch: both losses logged,
    LM + head saved by save_llara with the tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from llmret.llara.modeling import LlaraModel
    from llmret.llara.objective import PAD, LlaraObjective, build_training_batch

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = tiny_llama_config(len(tok), attn_implementation="sdpa", tie_word_embeddings=True)
    objective = LlaraObjective(max_text_length=16)
    model = LlaraModel(LlamaForCausalLM(cfg), objective, head="copy")

    def collate_pairs(items):
        return build_training_batch(tok, [a for a, _ in items], [b for _, b in items], cfg.vocab_size, objective)

    args = TrainingArgs(
        output_dir=str(tmp_path / "final"),
        checkpoint_dir=str(tmp_path / "ckpt"),
        max_steps=6,
        per_device_batch_size=2,
        learning_rate=1e-2,
        save_every=3,
        log_every=3,
    )
    result = train(
        model,
        PAIRS,
        collate_pairs,
        args,
        tokenizer=tok,
        save_fn=save_llara,
        count_tokens=lambda b: int((b.segments != PAD).sum()),
    )
    steps = _steps(_records(tmp_path / "ckpt" / "train_log.jsonl"))
    assert {"loss", "loss_ebae", "loss_ebar", "tokens_per_s"} <= set(steps[6])
    assert steps[6]["loss"] < steps[3]["loss"] and steps[6]["tokens_per_s"] > 0
    assert steps[6]["loss"] == pytest.approx(steps[6]["loss_ebae"] + steps[6]["loss_ebar"])
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert {
        "model.safetensors",
        "projection.safetensors",
        "llara.json",
        "tokenizer.json",
        "training_state.json",
    } <= names
    assert result["final_loss"] == steps[6]["loss"]


if __name__ == "__main__":
    _script(sys.argv[1])
    sys.exit(0)
