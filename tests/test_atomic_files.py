"""Atomic writes and the clean-up of what killed writers leave behind."""

import os
import subprocess
import sys

from llmret import atomic_files


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_an_output_are_removed_and_live_ones_kept(tmp_path, caplog):
    out = tmp_path / "scifact.zip"
    part = tmp_path / ".scifact.zip.part-1f2e3d4c"
    part.write_bytes(b"x" * 1000)
    extract = tmp_path / ".scifact.zip.extract-0a0b0c0d"
    (extract / "corpus").mkdir(parents=True)
    (extract / "corpus" / "c.jsonl").write_text("{}")
    dead = tmp_path / f".scifact.zip.tmp-{_dead_pid()}"
    dead.write_text("half")
    live = tmp_path / f".scifact.zip.tmp-{os.getppid()}"  # another process that still runs
    live.write_text("being written")
    other = tmp_path / ".other.zip.part-1f2e3d4c"
    other.write_text("not ours")
    unrelated = tmp_path / "scifact.zip.md5"
    unrelated.write_text("kept")

    removed = atomic_files.remove_stale_temporaries([out, tmp_path / "missing" / "x"])

    assert sorted(removed) == sorted([part, extract, dead])
    assert live.exists() and other.exists() and unrelated.exists()
    assert any("left by an earlier run" in r.getMessage() for r in caplog.records)


def test_atomic_publish_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"

    def fail(tmp):
        tmp.write_bytes(b"partial")
        raise RuntimeError("killed")

    try:
        atomic_files.atomic_publish(fail, target)
    except RuntimeError:
        pass
    assert list(tmp_path.iterdir()) == []
