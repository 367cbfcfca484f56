"""Checkpoint saves at 7B scale (issue 28): a crash-safe order (the new tag complete, then
`latest`, then the old one goes), so a run with retention 1 holds one checkpoint after every
completed save and two only while a save is under way, and a kill mid-save leaves the
previous one in force. A fake engine writes the files (no DeepSpeed)."""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path

import pytest
from torch import nn

from llmret.training import checkpointing
from llmret.training.checkpointing import LATEST, TRAINER_STATE, latest_checkpoint, save_checkpoint


class FakeEngine:
    """``save_checkpoint`` as DeepSpeed lays it out (a tag folder of rank files), recording
    which tags were on disk while it wrote; ``fail_after`` files, it raises (a kill)."""

    def __init__(self, nbytes: int = 1000):
        self.module = nn.Linear(2, 2)
        self.nbytes, self.fail_after, self.seen = nbytes, None, []

    def save_checkpoint(self, save_dir, tag, save_latest, exclude_frozen_parameters):
        assert save_latest is False  # our atomic marker, not DeepSpeed's
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        for i, name in enumerate(("mp_rank_00_model_states.pt", "zero_pp_rank_0_optim_states.pt")):
            if self.fail_after is not None and i >= self.fail_after:
                raise KeyboardInterrupt("killed while saving")
            (folder / name).write_bytes(b"x" * self.nbytes)
            self.seen.append(sorted(p.name for p in Path(save_dir).glob("step*")))


@pytest.fixture
def no_collectives(monkeypatch):
    """deepspeed.comm.barrier as a no-op (one process, no process group)."""
    comm = types.SimpleNamespace(barrier=lambda: None)
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(comm=comm))
    monkeypatch.setitem(sys.modules, "deepspeed.comm", comm)


def _tags(ckpt: Path) -> list[str]:
    return sorted(p.name for p in ckpt.glob("step*"))


def test_retention_1_holds_one_checkpoint_after_each_save_and_two_at_the_peak(tmp_path, no_collectives):
    ckpt, engine = tmp_path / "ckpt", FakeEngine()
    for step in (5, 10, 15):
        save_checkpoint(engine, ckpt, f"step{step}", {"step": step}, rank=0, keep=1)
        assert _tags(ckpt) == [f"step{step}"] and latest_checkpoint(ckpt) == f"step{step}"
    # while step10 and step15 were written, the previous tag was still complete beside them
    assert ["step10", "step5"] in engine.seen and ["step10", "step15"] in engine.seen
    assert max(len(seen) for seen in engine.seen) == 2


def test_a_kill_mid_save_leaves_the_previous_checkpoint_in_force(tmp_path, no_collectives):
    ckpt, engine = tmp_path / "ckpt", FakeEngine()
    save_checkpoint(engine, ckpt, "step10", {"step": 10}, rank=0, keep=1)
    engine.fail_after = 1
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(engine, ckpt, "step20", {"step": 20}, rank=0, keep=1)
    assert (ckpt / LATEST).read_text() == "step10" and latest_checkpoint(ckpt) == "step10"
    assert (ckpt / "step10" / TRAINER_STATE).is_file() and len(list((ckpt / "step10").iterdir())) == 3
    assert not (ckpt / "step20" / TRAINER_STATE).exists()  # partial: never named by `latest`
    engine.fail_after = None
    save_checkpoint(engine, ckpt, "step30", {"step": 30}, rank=0, keep=1)
    assert _tags(ckpt) == ["step30"]  # the partial tag and the old one are gone


def test_a_save_short_of_space_is_announced(tmp_path, no_collectives, monkeypatch, caplog):
    ckpt, engine = tmp_path / "ckpt", FakeEngine(nbytes=5000)
    save_checkpoint(engine, ckpt, "step1", {"step": 1}, rank=0, keep=1)
    assert checkpointing.checkpoint_bytes(ckpt / "step1") > 10_000
    usage = type("usage", (), {"free": 3000})
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage)
    with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
        save_checkpoint(engine, ckpt, "step2", {"step": 2}, rank=0, keep=1)
    assert "the next checkpoint needs about" in caplog.text and "beside step1" in caplog.text
