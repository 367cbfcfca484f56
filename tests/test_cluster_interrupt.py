"""Stopping a run early (issue 28): SIGTERM/SIGUSR1, the launcher's stop file and the Slurm
job's time limit make the loop save after the current step and end with exit code 75; the
launcher forwards its signals to the ranks, keeps torchrun from killing them, and requeues
the Slurm job; the rerun resumes from that checkpoint with the weights an uninterrupted run
has."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_launch import tiny_llara_inputs  # noqa: F401  # a fixture: a tiny Llama and one LLaRA shard

from llmret import launch, registry
from llmret.launch import INTERRUPTED_EXIT_CODE, TrainingInterrupted
from llmret.training import interruption
from llmret.training.interruption import StopRequests

STOP_VARS = (launch.STOP_FILE_ENV, launch.STOP_AT_ENV, launch.INTERRUPTED_FILE_ENV, "SLURM_JOB_ID")


@pytest.fixture(autouse=True)
def no_stop_settings(monkeypatch):
    for var in STOP_VARS:
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------- the loop's side


def test_a_signal_is_noted_not_fatal_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in launch.STOP_SIGNALS}
    with StopRequests(env={}) as stops:
        assert stops.reason() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stops.reason() == "signal SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # the process lives on: the step finishes first
        assert stops.reason() == "signal SIGTERM"
    assert {s: signal.getsignal(s) for s in launch.STOP_SIGNALS} == before


def test_the_stop_file_and_the_deadline(tmp_path):
    now = [1000.0]
    stop = tmp_path / "stop"
    stops = StopRequests(env={launch.STOP_FILE_ENV: str(stop), launch.STOP_AT_ENV: "1100"}, clock=lambda: now[0])
    assert stops.reason(next_step_s=50) is None
    assert stops.reason(next_step_s=100) == "the job's time limit is near"  # the next step would end at it
    now[0] = 1090.0
    assert stops.reason(next_step_s=5) is None and stops.reason(next_step_s=10) is not None
    stop.touch()
    assert stops.reason() == "the launcher was asked to stop"


def test_a_deadline_already_past_at_the_start_is_dropped(caplog):
    stops = StopRequests(env={launch.STOP_AT_ENV: "10"}, clock=lambda: 20.0)
    stops.check_deadline(step=7)
    assert stops.deadline is None and stops.reason() is None
    assert "passed before step 8" in caplog.text


def test_the_ranks_agree_to_stop_when_any_of_them_is_asked(monkeypatch):
    reduced = []

    def all_reduce(values, device, world_size, op):
        reduced.append((values, op))
        return [1.0]  # another rank has a reason

    monkeypatch.setattr(interruption, "all_reduce_floats", all_reduce)
    stops = StopRequests(env={})
    assert stops.agreed(0.0, torch.device("cpu"), world_size=4) == "another rank was asked to stop"
    assert reduced == [([0.0], "MAX")]
    monkeypatch.setattr(interruption, "all_reduce_floats", lambda *a, **k: [0.0])
    assert stops.agreed(0.0, torch.device("cpu"), world_size=4) is None


def test_interrupt_records_the_step_for_the_launcher(tmp_path):
    marker = tmp_path / "interrupted"
    stops = StopRequests(env={launch.INTERRUPTED_FILE_ENV: str(marker)})
    exc = stops.interrupt(12, "signal SIGTERM", rank=1)
    assert not marker.exists()  # rank 0 writes it
    exc = stops.interrupt(12, "signal SIGTERM", rank=0)
    assert json.loads(marker.read_text()) == {"step": 12, "reason": "signal SIGTERM"}
    assert isinstance(exc, SystemExit) and exc.code == INTERRUPTED_EXIT_CODE == 75 and exc.step == 12


# --------------------------------------------------------------------------- the launcher's side


def test_the_launcher_turns_its_signals_into_a_stop_file(tmp_path):
    stop = tmp_path / "stop"
    before = signal.getsignal(signal.SIGTERM)
    with launch.forwarded_stop_requests(stop) as received:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.exists() and received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


class Runner:
    """A stand-in for subprocess.run that records the commands."""

    def __init__(self, rc: int = 0, stdout: str = ""):
        self.calls, self.rc, self.stdout = [], rc, stdout

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        return subprocess.CompletedProcess(cmd, self.rc, stdout=self.stdout, stderr="refused" if self.rc else "")


def test_requeue_only_inside_a_slurm_job_and_unless_switched_off():
    runner = Runner()
    assert not launch.requeue_slurm_job({}, runner) and runner.calls == []
    assert not launch.requeue_slurm_job({"SLURM_JOB_ID": "42", launch.REQUEUE_ENV: "0"}, runner)
    assert launch.requeue_slurm_job({"SLURM_JOB_ID": "42"}, runner)
    assert runner.calls == [["scontrol", "requeue", "42"]]
    assert not launch.requeue_slurm_job({"SLURM_JOB_ID": "42"}, Runner(rc=1))  # Snakemake's retries then


def test_the_stop_deadline_comes_from_the_slurm_jobs_end():
    end = "2026-12-06T10:00:00"
    epoch = time.mktime(time.strptime(end, "%Y-%m-%dT%H:%M:%S"))
    runner = Runner(stdout=end + "\n")
    env = {"SLURM_JOB_ID": "42", launch.STOP_MARGIN_ENV: "900"}
    assert launch.set_stop_deadline(env, runner) == epoch - 900
    assert float(env[launch.STOP_AT_ENV]) == epoch - 900 and runner.calls == [["squeue", "-h", "-j", "42", "-o", "%e"]]
    assert launch.set_stop_deadline(env, Runner(stdout="2030-01-01T00:00:00")) == epoch - 900  # set once
    env = {"SLURM_JOB_ID": "42"}
    assert launch.set_stop_deadline(env, runner) == epoch - launch.DEFAULT_STOP_MARGIN_S
    for unknown in ("N/A", "Unknown", ""):
        assert launch.set_stop_deadline({"SLURM_JOB_ID": "1"}, Runner(stdout=unknown)) is None
    assert launch.set_stop_deadline({}, runner) is None


def _interrupting_stage(**kwargs):
    raise TrainingInterrupted(3, "signal SIGTERM")


def test_run_requeues_an_interrupted_slurm_job_and_ends_with_75(monkeypatch):
    monkeypatch.setitem(
        registry.STAGES, "probe", registry.Stage("probe", spec="", entry=f"{__name__}:_interrupting_stage", data=None)
    )
    monkeypatch.setattr(launch, "slurm_end_time", lambda *a, **k: None)
    requeued = []
    monkeypatch.setattr(launch, "requeue_slurm_job", lambda *a, **k: requeued.append(True))
    with pytest.raises(TrainingInterrupted) as e:
        launch.run("probe", {}, nproc=1)
    assert e.value.code == 75 and requeued == [True]


# A stand-in for torchrun: checks what the launcher set up, waits for the stop file, then
# does what rank 0 does when it stops early.
FAKE_RANKS = r"""
import json, os, signal, sys, time
from pathlib import Path
ignored = [signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1)]
Path(os.environ["PROBE_OUT"]).write_text(json.dumps(
    {"ignored": ignored, "torchelastic": os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE")}))
stop = Path(os.environ["LLMRET_STOP_FILE"])
deadline = time.time() + 60
while not stop.exists() and time.time() < deadline:
    time.sleep(0.05)
Path(os.environ["LLMRET_INTERRUPTED_FILE"]).write_text(json.dumps({"step": 9, "reason": "stop file"}))
sys.exit(75)
"""


def test_signals_reach_the_ranks_through_the_stop_file(tmp_path, monkeypatch):
    """SIGTERM to the launcher while its ranks train: it stays alive, the ranks (started with
    SIGTERM and SIGUSR1 ignored, torchrun told not to handle SIGTERM) see the stop file, save,
    and the launcher raises TrainingInterrupted with their step."""
    out = tmp_path / "probe.json"
    monkeypatch.setenv("PROBE_OUT", str(out))
    monkeypatch.setattr(launch, "torchrun_command", lambda task, args, n: [sys.executable, "-c", FAKE_RANKS])

    def signal_when_started():
        deadline = time.time() + 60
        while not out.exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_when_started, daemon=True).start()
    with pytest.raises(TrainingInterrupted) as e:
        launch._run_ranks("pretraining", {}, 2)
    assert e.value.step == 9 and e.value.code == 75
    assert json.loads(out.read_text()) == {"ignored": [True, True], "torchelastic": "SIGINT,SIGHUP,SIGQUIT"}


def test_a_failing_rank_without_a_save_is_an_error(monkeypatch):
    monkeypatch.setattr(launch, "torchrun_command", lambda task, args, n: [sys.executable, "-c", "raise SystemExit(1)"])
    with pytest.raises(RuntimeError, match="failed \\(exit code 1\\)"):
        launch._run_ranks("pretraining", {}, 2)


# --------------------------------------------------------------------------- the loop, for real


def _train(root: Path, **over):
    from test_training import Pairs, Regressor, collate, count_rows, regressor_args, save_regressor

    from llmret.training.loop import train

    torch.manual_seed(0)
    hook = over.pop("on_collate", None)
    calls = [0]

    def collate_and_hook(items):
        calls[0] += 1
        if hook is not None:
            hook(calls[0])
        return collate(items)

    args = regressor_args(root, deterministic=True, **over)
    return train(Regressor(), Pairs(), collate_and_hook, args, save_fn=save_regressor, count_tokens=count_rows)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "clean_process_state")
def test_stopped_runs_save_and_resume_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    """SIGUSR1 during step 7 (checkpoints every 5): the run saves step 7 and stops with exit
    code 75, keeping one checkpoint; the rerun resumes there, is stopped by the stop file during
    step 9, and the third attempt finishes with the weights of a run never stopped."""
    from safetensors.torch import load_file

    from llmret.training.checkpointing import LATEST

    gas = 2  # micro-batches per step (regressor_args)
    run, clean = tmp_path / "run", tmp_path / "clean"
    with pytest.raises(TrainingInterrupted) as e:
        _train(run, on_collate=lambda n: n == 6 * gas + 1 and os.kill(os.getpid(), signal.SIGUSR1))
    assert e.value.step == 7 and e.value.code == 75
    ckpt = run / "ckpt"
    assert (ckpt / LATEST).read_text() == "step7" and sorted(p.name for p in ckpt.glob("step*")) == ["step7"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored

    stop = tmp_path / "stop"
    monkeypatch.setenv(launch.STOP_FILE_ENV, str(stop))
    with pytest.raises(TrainingInterrupted) as e:
        _train(run, on_collate=lambda n: n == gas + 1 and stop.touch())  # this attempt's step 9
    assert e.value.step == 9 and (ckpt / LATEST).read_text() == "step9"
    stop.unlink()
    state = _train(run)
    assert state["resumed_from_step"] == 9 and state["steps"] == 20
    _train(clean)
    records = [json.loads(x) for x in (ckpt / "train_log.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records if r["event"] != "step"] == [
        ("start", 0),
        ("resume", 7),
        ("resume", 9),
    ]
    a, b = load_file(run / "final" / "model.safetensors"), load_file(clean / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_both_ranks_at_one_step_and_the_rerun_resumes(
    tmp_path,
    tiny_llara_inputs,  # noqa: F811
    monkeypatch,
):
    """Two ranks under torchrun (CPU, gloo): SIGTERM to the launcher once step 2 is logged;
    both ranks save the same step, the launcher raises TrainingInterrupted (exit code 75),
    and the same call then resumes from that checkpoint and finishes."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    model_dir, manifest, _ = tiny_llara_inputs
    log = tmp_path / "log.jsonl"
    kwargs = {
        "model_dir": str(model_dir),
        "manifest": str(manifest),
        "spec": {"shards": 1, "max_text_length": 16, "min_words": 4},
        "training": {
            "max_steps": 200,
            "per_device_batch_size": 2,
            "learning_rate": 1e-3,
            "lr_scheduler": "constant",
            "save_every": 1000,
            "log_every": 1,
            "log_path": str(log),
        },
        "out_dir": str(tmp_path / "out"),
        "checkpoint_dir": str(tmp_path / "ckpt"),
    }

    def signal_after_step_2():
        deadline = time.time() + 300
        while time.time() < deadline:
            steps = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
            if any(r.get("event") == "step" and r["step"] >= 2 for r in steps):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    threading.Thread(target=signal_after_step_2, daemon=True).start()
    with pytest.raises(TrainingInterrupted) as e:
        launch.run("pretraining", kwargs, nproc=2)
    stopped = e.value.step
    assert 2 <= stopped < 200 and e.value.code == 75
    assert (tmp_path / "ckpt" / "latest").read_text() == f"step{stopped}"
    state = json.loads((tmp_path / "ckpt" / f"step{stopped}" / "trainer_state.json").read_text())
    assert state["step"] == stopped and state["order"]["world_size"] == 2
    # constant lr: max_steps is no part of the recipe, so the rerun may end sooner
    kwargs["training"]["max_steps"] = stopped + 2
    launch.run("pretraining", kwargs, nproc=2)
    final = json.loads((tmp_path / "out" / "training_state.json").read_text())
    assert final["resumed_from_step"] == stopped and final["steps"] == stopped + 2 and final["world_size"] == 2
