"""The GPU check (benchmarks/gpu_check.py, docs/gpu_check.md) at tiny sizes on the CPU: every
part runs through the same code as on a lent GPU (torchrun, DeepSpeed, the library's encoder,
sparse loss and search) and reports ok, and the killed-and-resumed LLaRA run repeats the
uninterrupted run's losses exactly."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"env", "prepare", "llara", "resume", "lora", "csplade", "encode", "search"}
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.slow  # starts torchrun and DeepSpeed six times: about two minutes on 2 cores
def test_tiny_cpu_check_reports_every_part_ok(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny"]
    cmd += ["--out", str(tmp_path / "gc"), "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    report = json.loads((tmp_path / "gc.json").read_text())
    assert {p["part"] for p in report["parts"]} == PARTS
    rows = {r["check"]: r for p in report["parts"] for r in p["rows"]}
    failed = {check: r["figures"] for check, r in rows.items() if r["status"] != "ok"}
    assert not failed
    assert {"LLaRA 2 layers", "LLaRA 4 layers", "LoRA merged vs unmerged", "search faiss-cpu vs torch"} <= set(rows)

    resume = rows["LLaRA kill at 5, resume to 10"]["data"]
    assert resume["identical"] and resume["resumed_from"] == 5
    reference = {int(k): v for k, v in resume["reference"].items()}
    assert sorted(reference) == list(range(1, 11))
    for part in ("before_kill", "after_resume"):
        assert {int(k): v for k, v in resume[part].items()} == {k: reference[k] for k in map(int, resume[part])}
    assert sorted(map(int, resume["after_resume"])) == list(range(6, 11))

    table = (tmp_path / "gc.md").read_text()
    print(table)  # shown with -s: the figures of this machine
    assert "| part | check | status | s | figures |" in table
    assert all(f"| {part} |" in table for part in PARTS)
    with tarfile.open(tmp_path / "gc_logs.tar.gz") as tar:
        assert "runs/resume/R/torchrun.log" in tar.getnames()
