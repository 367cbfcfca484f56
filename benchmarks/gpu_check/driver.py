"""The command line and the driver: every part in a child process of its own (a crash, a hang
or a CUDA error in one cannot take the others down, and its memory figures are its own) under
its own timeout and a total budget; then one table, printed and written as Markdown and JSON.

The driver imports no torch: it decides the device with ``llmret.launch``'s own count, which
asks CUDA in a subprocess."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from .common import SCRIPT, SRC, Context, error_line, kill_tree, read_json, row, write_json


@dataclass(frozen=True)
class Part:
    name: str
    target: str  # "module:function" in this package
    timeout_s: int
    reserve_s: int  # kept for this part while earlier ones run
    needs_prepare: bool


PARTS = (
    Part("env", "setup_parts:env", 60, 15, False),
    Part("prepare", "setup_parts:prepare", 90, 20, False),
    Part("llara", "training:llara", 150, 60, True),
    Part("resume", "training:resume", 180, 60, True),
    Part("lora", "training:lora", 100, 40, True),
    Part("csplade", "kernels:csplade", 60, 25, False),
    Part("encode", "kernels:encode", 60, 25, True),
    Part("search", "kernels:search", 75, 25, False),
)
GPU_ONLY = "torch here sees no CUDA device: the full-size parts need one (--device cpu --tiny runs them small)"
NO_CUDA_TORCH = (
    "the machine has an NVIDIA driver but this torch sees no CUDA device (a CPU build?): install a CUDA torch"
)


class Stopped(Exception):
    """SIGTERM (``timeout`` ran out) or SIGINT: the running part is ended, the table written."""


def _stop(signum, _frame):
    raise Stopped(signal.Signals(signum).name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="llmret's GPU check (docs/gpu_check.md)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU smoke run)")
    p.add_argument("--out", default="gpu_check", help="writes OUT.md, OUT.json and OUT_logs.tar.gz")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all parts together")
    p.add_argument("--parts", default=",".join(x.name for x in PARTS), help="comma-separated subset")
    p.add_argument("--work", help="work folder (default: a fresh one, in /dev/shm when it has room; removed)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--part", help=argparse.SUPPRESS)  # a child: run this part
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- a child: one part


def run_part(args: argparse.Namespace) -> int:
    ctx = Context(Path(args.work), args.device, args.tiny)
    part = {x.name: x for x in PARTS}[args.part]
    module, _, fn = part.target.partition(":")
    t0 = time.perf_counter()
    try:
        if ctx.device == "cpu" and args.tiny:
            import torch

            torch.set_num_threads(1)  # a tiny model on a shared CPU: more threads only contend
        rows = getattr(importlib.import_module(f"{__package__}.{module}"), fn)(ctx)
    except Exception as e:
        traceback.print_exc()
        rows = [row(part.name, False, f"{type(e).__name__}: {e}"[:500])]
    write_json(Path(args.result), {"rows": rows, "seconds": time.perf_counter() - t0})
    return 0


# --------------------------------------------------------------------------- the driver


def resolve_device(asked: str) -> tuple[str, int]:
    from llmret import launch

    gpus = launch.machine_gpu_count()
    return ("cuda" if gpus else "cpu") if asked == "auto" else asked, gpus


def work_folder(args: argparse.Namespace, device: str) -> Path:
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return Path(args.work)
    roomy = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > (48e9 if device == "cuda" else 2e9)
    return Path(tempfile.mkdtemp(prefix="llmret-gpu-check-", dir="/dev/shm" if roomy else None))


def child_env(device: str) -> dict:
    from llmret import launch

    launch.prepare_environment(str(SRC))  # ranks import llmret from the checkout
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(SRC.parent / ".cache" / "torch_extensions"))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def spawn(part: Part, args: argparse.Namespace, device: str, work: Path, timeout: float) -> dict:
    """Run one part as a child process; its rows, or one row saying how it failed."""
    result = work / "results" / f"{part.name}.json"
    result.unlink(missing_ok=True)
    log_path = work / "logs" / f"{part.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(SCRIPT), "--part", part.name, "--work", str(work), "--device", device]
    cmd += ["--result", str(result)] + (["--tiny"] if args.tiny else [])
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(device))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # also when the driver itself is stopped
            if proc.poll() is None:
                kill_tree(proc.pid)
    seconds = time.perf_counter() - t0
    data = read_json(result)
    if rc is None:
        rows = [{**row(part.name, False, f"timed out after {timeout:.0f} s; last line: {error_line(log_path)}")}]
        rows[0]["status"] = "timeout"
    elif data is None:
        rows = [row(part.name, False, f"exit code {rc}: {error_line(log_path)}")]
    else:
        rows = data["rows"]
    return {"part": part.name, "seconds": seconds, "rows": rows, "log": str(log_path)}


def run_all(args: argparse.Namespace, device: str, gpus: int, work: Path, done: list[dict]) -> None:
    """Run the wanted parts in order, appending each one's record to ``done``."""
    from llmret import launch

    wanted = [x for x in PARTS if x.name in set(args.parts.split(","))]
    deadline = time.monotonic() + args.budget
    for i, part in enumerate(wanted):
        reason = None
        if device == "cuda" and gpus == 0 and part.name != "env":
            reason = GPU_ONLY
        elif device == "cpu" and not args.tiny and part.name != "env":
            driver = launch.NVIDIA_GPUS.is_dir() or launch.NVIDIA_CONTROL.exists()
            reason = NO_CUDA_TORCH if driver else "full sizes on the CPU would take hours: use --tiny, or a GPU"
        elif part.needs_prepare and not (work / "inputs.json").is_file():
            reason = "no inputs: the prepare part did not finish"
        # what is left, less what the later parts are promised, but never less than this part's own promise
        left, later = deadline - time.monotonic(), sum(x.reserve_s for x in wanted[i + 1 :])
        timeout = min(part.timeout_s, max(left - later, min(part.reserve_s, left)))
        if reason is None and timeout < 10:
            reason = f"out of budget ({args.budget:.0f} s for all parts)"
        if reason:
            skipped = row(part.name, False, reason)
            done.append({"part": part.name, "seconds": 0.0, "rows": [{**skipped, "status": "skipped"}]})
        else:
            try:
                done.append(spawn(part, args, device, work, timeout))
            except Stopped as e:
                stopped = row(part.name, False, f"the check was stopped ({e}) while this part ran; later parts not run")
                done.append({"part": part.name, "seconds": 0.0, "rows": [{**stopped, "status": "stopped"}]})
                break
        statuses = ", ".join(r["status"] for r in done[-1]["rows"])
        print(f"[{time.monotonic() - deadline + args.budget:6.1f} s] {part.name}: {statuses}", flush=True)


def table(done: list[dict]) -> str:
    lines = ["| part | check | status | s | figures |", "|---|---|---|---|---|"]
    for part in done:
        for j, r in enumerate(part["rows"]):
            seconds = f"{part['seconds']:.1f}" if j == 0 else ""
            figures = r["figures"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {part['part'] if j == 0 else ''} | {r['check']} | {r['status']} | {seconds} | {figures} |")
    return "\n".join(lines)


def keep_logs(work: Path, dest: Path) -> None:
    """The parts' logs, the torchrun logs and the train logs in one archive beside the table
    (the work folder goes; one file, since a lent machine returns few). Each log's last 2 MB."""
    import io
    import tarfile

    dest.unlink(missing_ok=True)
    logs = [*work.glob("logs/*.log"), *work.glob("runs/**/torchrun.log"), *work.glob("runs/**/log.jsonl")]
    if not logs:
        return
    with tarfile.open(dest, "w:gz") as tar:
        for src in sorted(logs):
            data = src.read_bytes()[-2_000_000:]
            info = tarfile.TarInfo("/".join(src.relative_to(work).parts))
            info.size, info.mtime = len(data), int(src.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))


def report(args: argparse.Namespace, device: str, done: list[dict], wall: float) -> str:
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    env_rows = next((p["rows"] for p in done if p["part"] == "env"), [])
    gpu = next((r["data"].get("cuda_devices") for r in env_rows if r["check"] == "environment"), None)
    where = ", ".join(d["name"] for d in gpu) if gpu else "no CUDA device"
    counts = {}
    for r in (r for p in done for r in p["rows"]):
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    head = [
        f"# llmret GPU check, {stamp}",
        "",
        f"`python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}`: device {device} ({where}), "
        f"sizes {'tiny' if args.tiny else 'full'}, {wall:.0f} s in all; "
        + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())),
        "",
    ]
    return "\n".join(head) + table(done) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    t0 = time.monotonic()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    device, gpus = resolve_device(args.device)
    if device == "cuda" and gpus == 0:
        print(f"--device cuda: {GPU_ONLY}", flush=True)
    work = work_folder(args, device)
    print(f"device {device} ({gpus} CUDA device(s) seen), work folder {work}", flush=True)
    out = Path(args.out[:-3] if args.out.endswith(".md") else args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: list[dict] = []
    try:
        run_all(args, device, gpus, work, done)
    except Stopped as e:  # between parts: the table of those that ran is still written
        print(f"stopped ({e})", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the logs and the table be written
        keep_logs(work, out.with_name(out.name + "_logs.tar.gz"))
        if not args.keep_work and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.monotonic() - t0
    text = report(args, device, done, wall)
    out.with_name(out.name + ".md").write_text(text)
    meta = {"argv": sys.argv[1:], "device": device, "gpus_seen": gpus, "tiny": args.tiny, "wall_s": wall}
    (out.with_name(out.name + ".json")).write_text(json.dumps({**meta, "parts": done}, indent=2, default=str) + "\n")
    print(text, flush=True)
    print(f"written: {out}.md, {out}.json, {out}_logs.tar.gz", flush=True)
    return 0 if all(r["status"] == "ok" for p in done for r in p["rows"]) else 1
