"""Faults in run files: a writer that fails (disk full, an interrupt, a kill) leaves the old run
and record as they were and no temporary (a killed one's goes when the job runs again); a run
cut short or altered later is an error naming the file, never a lower score (issue 30's items
3 and 8)."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from llmret import atomic_files
from llmret.data import trec
from llmret.results import evaluation

OLD = {"q1": [("d1", 2.0), ("d2", 1.0)]}


def _run(queries: int, depth: int) -> dict:
    return {f"q{i:03d}": [(f"d{j}", float(depth - j)) for j in range(depth)] for i in range(queries)}


def _old_run(folder):
    path = folder / "r.trec"
    trec.write_run(path, OLD, tag="t", header={"top_k": 2})
    return path, path.read_bytes(), trec.record_path(path).read_bytes()


def _assert_old_run_intact(path, run_bytes, record_bytes):
    assert path.read_bytes() == run_bytes and trec.record_path(path).read_bytes() == record_bytes
    assert trec.read_run(path) == OLD
    assert sorted(p.name for p in path.parent.iterdir()) == ["r.trec", "r.trec.json"]


def test_disk_full_while_writing_the_run_leaves_no_temporary(tmp_path, monkeypatch):
    old = _old_run(tmp_path)
    real = trec._write_lines

    def disk_full_midway(f, run, tag):
        real(f, dict(list(run.items())[:3]), tag)  # some queries reach the file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(trec, "_write_lines", disk_full_midway)
    with pytest.raises(OSError) as err:
        trec.write_run(old[0], _run(10, 5), tag="t")
    assert err.value.errno == errno.ENOSPC
    _assert_old_run_intact(*old)


def test_disk_full_while_writing_the_record_leaves_no_temporary(tmp_path, monkeypatch):
    old = _old_run(tmp_path)
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the run's temporary went through; the record's does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        trec.write_run(old[0], _run(10, 5), tag="t")
    _assert_old_run_intact(*old)


def test_an_interrupt_while_writing_leaves_no_temporary(tmp_path, monkeypatch):
    old = _old_run(tmp_path)

    def interrupted(f, run, tag):
        f.write(b"q1 Q0 d1 1 2.000000 t\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(trec, "_write_lines", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trec.write_run(old[0], _run(10, 5), tag="t")
    _assert_old_run_intact(*old)


def test_a_full_tmpfs_leaves_no_temporary(tmp_path):
    """The real thing: a 64 KiB tmpfs, a run of about 1 MB."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        old = _old_run(mnt)
        with pytest.raises(OSError) as err:
            trec.write_run(old[0], _run(300, 100), tag="t")
        assert err.value.errno == errno.ENOSPC
        _assert_old_run_intact(*old)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_killed_writer_leaves_the_old_run_and_its_temporary_goes_with_the_next_job(tmp_path):
    """SIGKILL runs no cleanup: the temporary stays, but the old run and record are intact
    and agree, and the job's next run removes the temporary before it writes."""
    old = _old_run(tmp_path)
    ready = tmp_path.parent / f"{tmp_path.name}-ready"
    child = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from llmret.data import trec

        def stalled(f, run, tag):
            f.write(b"q1 Q0 d1 1 2.000000 t\\n")
            f.flush()
            Path({str(ready)!r}).touch()
            time.sleep(60)

        trec._write_lines = stalled
        trec.write_run({str(old[0])!r}, {{"q1": [("d9", 1.0)]}}, tag="t")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", child], env=env)
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, "the writer did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".r.trec.tmp-" + str(proc.pid), "r.trec", "r.trec.json"]
    assert trec.read_run(old[0]) == OLD
    assert [p.name for p in atomic_files.remove_stale_temporaries([old[0]])] == [left[0]]
    _assert_old_run_intact(*old)


def test_a_run_cut_in_half_is_refused_not_scored(tmp_path):
    """The reviewer's case: SciFact-sized (300 queries), cut at a line boundary to half its
    lines, so 151 queries would have gone unanswered and nDCG@10 halved; now an error."""
    run_path, qrels_path = tmp_path / "scifact.trec", tmp_path / "qrels.trec"
    trec.write_run(run_path, _run(300, 10), tag="t", header={"top_k": 10})
    trec.write_qrels(qrels_path, {f"q{i:03d}": {"d0": 1} for i in range(300)})
    full = evaluation.evaluate_files(run_path, qrels_path, ["ndcg@10"], 1, {"top_k": 10})
    assert full["metrics"]["ndcg@10"] == 1.0
    lines = run_path.read_bytes().splitlines(keepends=True)
    run_path.write_bytes(b"".join(lines[: 149 * 10]))  # about half: 149 queries' rankings
    with pytest.raises(trec.RunIntegrityError, match=rf"{run_path} is not the run its record scifact\.trec\.json"):
        evaluation.evaluate_files(run_path, qrels_path, ["ndcg@10"], 1, {"top_k": 10})
    # Unchecked, it would have scored as the reviewer saw: about half.
    half = evaluation.evaluate(trec.read_qrels(qrels_path), trec.read_run(run_path, verify=False), ["ndcg@10"])
    assert half["unanswered_queries"] == 151 and half["metrics"]["ndcg@10"] < 0.5


def test_a_run_and_its_record_copied_together_still_read(tmp_path):
    path, *_ = _old_run(tmp_path)
    other = tmp_path / "copy"
    other.mkdir()
    shutil.copy2(path, other / "r.trec")
    shutil.copy2(trec.record_path(path), other / "r.trec.json")
    assert trec.read_run(other / "r.trec") == OLD
