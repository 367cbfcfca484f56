"""Work done once per run, not once per rank and attempt (issue 28): rank 0 hashes the
inputs and shares the digests (cached by size and mtime beside the checkpoints), and the
negatives file is validated once into an index the other ranks and attempts read. Two real
gloo ranks (torch.distributed, no DeepSpeed) check the sharing."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from llmret.training import arguments, contrastive
from llmret.training.arguments import DIGEST_CACHE, cached_input_digests, input_digest
from llmret.training.contrastive import LazyGroups, group_index, group_index_path
from llmret.training.distributed import share_from_rank0

RECORD = {
    "query_id": "q0",
    "query": "what do cats do",
    "positive_passages": [{"docid": "d1", "title": "Cats", "text": "Cats purr."}],
    "negative_passages": [{"docid": "d2", "title": "", "text": "Dogs bark."}],
}


def _negatives(path: Path, n: int = 6) -> Path:
    rows = [
        {**RECORD, "query_id": f"q{i}", "negative_passages": RECORD["negative_passages"] * (i % 2)} for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def counted_hashes(monkeypatch):
    calls = []
    real = arguments.file_sha256

    def sha(path):
        calls.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(arguments, "file_sha256", sha)
    return calls


# --------------------------------------------------------------------------- digests


def test_digests_are_cached_by_size_and_mtime_beside_the_checkpoints(tmp_path, counted_hashes):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w" * 1000)
    data = _negatives(tmp_path / "negatives.jsonl")
    ckpt = tmp_path / "ckpt"
    first = cached_input_digests([model, data], ckpt)
    assert first == [input_digest(model), input_digest(data)]  # the same digests as without a cache
    assert sorted(counted_hashes) == sorted(["config.json", "model.safetensors", "negatives.jsonl"] * 2)
    counted_hashes.clear()
    assert cached_input_digests([model, data], ckpt) == first and counted_hashes == []  # a resumed attempt
    (model / "config.json").write_text('{"a": 1}')  # changed: hashed again, alone
    again = cached_input_digests([model, data], ckpt)
    assert counted_hashes == ["config.json"] and again[0] != first[0] and again[1] == first[1]
    assert set(json.loads((ckpt / DIGEST_CACHE).read_text())) == {
        str((model / "config.json").resolve()),
        str((model / "model.safetensors").resolve()),
        str(data.resolve()),
    }
    (ckpt / DIGEST_CACHE).write_text("not json")  # a broken cache is rebuilt, not trusted
    assert cached_input_digests([model, data], ckpt) == again


def test_the_plan_hashes_on_rank_0_only_and_uses_the_shared_digests(tmp_path, counted_hashes, monkeypatch):
    from llmret.training import loop

    data = _negatives(tmp_path / "negatives.jsonl")
    args = arguments.TrainingArgs(output_dir=str(tmp_path / "o"), checkpoint_dir=str(tmp_path / "c"))
    plan = loop._plan(nn.Linear(2, 2), args, 10, rank=0, world_size=1, inputs=[data])
    assert plan.recipe["inputs"] == [input_digest(data)] and (tmp_path / "c" / DIGEST_CACHE).is_file()
    counted_hashes.clear()
    shared = []
    monkeypatch.setattr(loop, "share_from_rank0", lambda fn, rank, ws: shared.append((rank, ws)) or ["from-rank-0"])
    plan = loop._plan(nn.Linear(2, 2), args, 10, rank=1, world_size=2, inputs=[data])
    assert plan.recipe["inputs"] == ["from-rank-0"] and shared == [(1, 2)] and counted_hashes == []


# --------------------------------------------------------------------------- negatives


def test_the_negatives_are_validated_once_and_the_index_shared(tmp_path, monkeypatch):
    path = _negatives(tmp_path / "negatives.jsonl")
    scans = []
    real = contrastive._scan_groups

    def scan(p):
        scans.append(p)
        time.sleep(0.2)  # long enough for the other threads to wait on the lock
        return real(p)

    monkeypatch.setattr(contrastive, "_scan_groups", scan)
    results = []
    threads = [threading.Thread(target=lambda: results.append(LazyGroups(path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(scans) == 1 and group_index_path(path).is_file()  # three "ranks", one pass
    assert [list(g) for g in results] == [list(results[0])] * 3 and len(results[0]) == 6
    assert results[0].without_negatives() == ["q0", "q2", "q4"]
    assert list(LazyGroups(path)) == list(results[0]) and len(scans) == 1  # a resumed attempt
    _negatives(tmp_path / "new.jsonl", n=4).replace(path)  # the file replaced: validated again
    assert len(LazyGroups(path)) == 4 and len(scans) == 2


def test_an_unwritable_index_costs_only_a_pass_per_process(tmp_path, monkeypatch):
    path = _negatives(tmp_path / "negatives.jsonl")
    monkeypatch.setattr(contrastive, "group_index_path", lambda p: tmp_path / "missing" / "x.npz")
    assert len(LazyGroups(path)) == 6
    assert not (tmp_path / "missing").exists()


def test_a_stale_or_foreign_index_is_not_trusted(tmp_path):
    path = _negatives(tmp_path / "negatives.jsonl")
    group_index(path)
    group_index_path(path).write_bytes(b"garbage")
    assert len(group_index(path)["starts"]) == 6


# --------------------------------------------------------------------------- two gloo ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        calls = Path(folder) / f"calls{rank}"

        def compute():
            calls.write_text("computed")
            return {"digests": ["abc"], "rank": rank}

        got = share_from_rank0(compute, rank, 2)
        failed = None
        try:
            share_from_rank0(lambda: 1 / 0, rank, 2)
        except (ZeroDivisionError, RuntimeError) as e:
            failed = f"{type(e).__name__}: {e}"
        (Path(folder) / f"out{rank}.json").write_text(json.dumps({"got": got, "failed": failed}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~7 s on 2 cores (the fast tier mocks the rank)
def test_rank_0_computes_and_every_rank_gets_its_answer_or_its_error(tmp_path):
    mp.start_processes(_rank, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    out = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in (0, 1)]
    assert out[0]["got"] == out[1]["got"] == {"digests": ["abc"], "rank": 0}
    assert (tmp_path / "calls0").exists() and not (tmp_path / "calls1").exists()
    assert out[0]["failed"] == "ZeroDivisionError: division by zero"
    assert out[1]["failed"] == "RuntimeError: rank 0 failed: ZeroDivisionError: division by zero"
