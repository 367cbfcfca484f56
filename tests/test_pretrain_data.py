import gzip
import hashlib
import io
import json
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA  # noqa: E402
from safetensors.numpy import load_file, save_file

from llmret.data import beir
from llmret.llara.modeling import LlaraModel
from llmret.llara.objective import NEXT, SELF, LlaraObjective, build_training_batch
from llmret.llara.pairs import Pair, pairs_from_beir, pairs_from_dpr_wiki, split_pairs
from llmret.llara.pretrain_shards import shard_of, tokenize_shard
from llmret.llara.shard_dataset import ShardDataset, collate, load_shard, read_manifest, write_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

SCIFACT_ZIP = SHARED_DATA / "beir" / "scifact.zip"
N_DOCS = 200


@pytest.fixture(scope="module")
def scifact_dir(tmp_path_factory) -> Path:
    """The first N_DOCS SciFact documents, corpus only: no queries or qrels exist to be read."""
    if not SCIFACT_ZIP.is_file():
        pytest.skip(f"{SCIFACT_ZIP} not available")
    d = tmp_path_factory.mktemp("beir") / "scifact"
    d.mkdir()
    with zipfile.ZipFile(SCIFACT_ZIP) as z, z.open("scifact/corpus.jsonl") as src:
        lines = [next(src) for _ in range(N_DOCS)]
    (d / "corpus.jsonl").write_bytes(b"".join(lines))
    return d


@pytest.fixture(scope="module")
def pairs(scifact_dir) -> list[Pair]:
    return list(pairs_from_beir([scifact_dir / "corpus.jsonl"]))


def _ids(tok, text, n):
    return tok(text, add_special_tokens=False)["input_ids"][:n]


def _shard_order(pairs, seed, shard):
    """The order tokenize_shard promises: ids sorted, then shuffled with Random(f"{seed}-{shard}")."""
    ids = sorted(p.id for p in pairs)
    random.Random(f"{seed}-{shard}").shuffle(ids)
    return ids


# --------------------------------------------------------------------------- DPR

DPR_TSV = (
    "id\ttext\ttitle\n"
    '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet."\tAaron\n'
    '2\t"He was the spokesman (""prophet"") of Moses."\tAaron\n'
    '3\t"A third passage\twith a quoted tab."\tAaron\n'
    '4\t"The only passage of its article."\tLonely\n'
    '5\t"Heroes is a song."\t"""Heroes"" (song)"\n'
    '6\t"It was released in 1977."\t"""Heroes"" (song)"\n'
)


@pytest.fixture
def dpr_gz(tmp_path) -> Path:
    p = tmp_path / "psgs_w100.tsv.gz"
    with gzip.open(p, "wt", encoding="utf-8", newline="") as f:
        f.write(DPR_TSV)
    return p


def test_dpr_pairs_follow_articles_and_csv_quoting(dpr_gz):
    got = list(pairs_from_dpr_wiki(dpr_gz))
    assert [p.id for p in got] == ["dpr-wiki:1", "dpr-wiki:2", "dpr-wiki:5"]
    assert got[0].text == 'Aaron Aaron ( or ; "Ahärôn") is a prophet.'
    assert got[0].next_text == got[1].text == 'He was the spokesman ("prophet") of Moses.'
    assert got[1].next_text == "A third passage\twith a quoted tab."
    assert (got[2].text, got[2].next_text) == ("Heroes is a song.", "It was released in 1977.")
    # The lonely article (passage 4) pairs with nothing, and nothing crosses article borders.
    assert all("only passage" not in p.text + p.next_text for p in got)


def test_dpr_max_passages_and_streams(dpr_gz, tmp_path):
    def ids(src, n):
        return [p.id for p in pairs_from_dpr_wiki(src, max_passages=n)]

    assert ids(dpr_gz, 0) == []
    assert ids(dpr_gz, 2) == ["dpr-wiki:1"]
    assert ids(dpr_gz, 3) == ["dpr-wiki:1", "dpr-wiki:2"]
    assert ids(dpr_gz, 5) == ["dpr-wiki:1", "dpr-wiki:2"]  # passage 6 unread: 5 has no partner yet
    assert ids(dpr_gz, 6) == ids(dpr_gz, None) == ["dpr-wiki:1", "dpr-wiki:2", "dpr-wiki:5"]
    # An already-open binary stream (e.g. an HTTP body), gzipped or plain, gives the same pairs.
    want = list(pairs_from_dpr_wiki(dpr_gz))
    for body in (dpr_gz.read_bytes(), DPR_TSV.encode()):
        stream = io.BytesIO(body)
        assert list(pairs_from_dpr_wiki(stream)) == want
        assert not stream.closed  # the caller's stream stays the caller's
    # A raw stream without peek() (as some HTTP clients hand out) works too.
    raw = io.FileIO(dpr_gz)
    assert list(pairs_from_dpr_wiki(raw)) == want
    assert not raw.closed
    raw.close()
    plain = tmp_path / "psgs_w100.tsv"
    plain.write_text(DPR_TSV, encoding="utf-8", newline="")
    assert list(pairs_from_dpr_wiki(plain)) == want


@pytest.fixture
def dpr_server(dpr_gz):
    """DPR's file served over HTTP on 127.0.0.1, as the real download would be."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(dpr_gz.parent))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_dpr_prefix_streamed_over_http_reparses_identically(dpr_gz, dpr_server, tmp_path):
    import hashlib

    from llmret.data.dpr import fetch_dpr_prefix, iter_dpr_passages

    out = tmp_path / "first3.tsv"
    info = fetch_dpr_prefix(f"{dpr_server}/{dpr_gz.name}", out, 3)
    assert info["passages"] == 3 and info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    strip = [(pid, text, title) for _, pid, text, title in iter_dpr_passages(dpr_gz, 3)]
    assert [(pid, text, title) for _, pid, text, title in iter_dpr_passages(out)] == strip
    assert [p.id for p in pairs_from_dpr_wiki(out)] == ["dpr-wiki:1", "dpr-wiki:2"]
    # a local path (mirror folder) works the same
    fetch_dpr_prefix(str(dpr_gz), tmp_path / "local.tsv", 3)
    assert (tmp_path / "local.tsv").read_bytes() == out.read_bytes()


def test_dpr_prefix_failures_leave_nothing(dpr_gz, dpr_server, tmp_path):
    from llmret.data.download import DownloadError
    from llmret.data.dpr import fetch_dpr_prefix

    with pytest.raises(ValueError, match="holds 6 passages, fewer than max_passages=7"):
        fetch_dpr_prefix(str(dpr_gz), tmp_path / "x.tsv", 7)
    with pytest.raises(DownloadError, match="404"):
        fetch_dpr_prefix(f"{dpr_server}/missing.tsv.gz", tmp_path / "x.tsv", 2)
    assert not list(tmp_path.glob("*x.tsv*"))


def test_dpr_malformed_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.tsv.gz"
    lines = DPR_TSV.splitlines(keepends=True)
    with gzip.open(bad, "wt", encoding="utf-8", newline="") as f:
        f.write("".join(lines[:3]) + "3\tno title column\n" + "".join(lines[4:]))
    with pytest.raises(ValueError, match=r"bad\.tsv\.gz:4: expected 3 tab-separated fields"):
        list(pairs_from_dpr_wiki(bad))
    # Lines before the error were fine, and a limit that stops before it never reads it.
    assert len(list(pairs_from_dpr_wiki(bad, max_passages=2))) == 1

    headless = tmp_path / "headless.tsv"
    headless.write_text("".join(lines[1:]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"headless\.tsv:1: expected header"):
        list(pairs_from_dpr_wiki(headless))
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.tsv: empty"):
        list(pairs_from_dpr_wiki(empty))


# --------------------------------------------------------------------------- BEIR


def test_pairs_from_beir_scifact(scifact_dir, pairs, monkeypatch):
    def no_labels(*a, **k):
        raise AssertionError("pretraining must not read labels")

    monkeypatch.setattr(beir, "load_qrels", no_labels)
    monkeypatch.setattr(beir, "load_queries", no_labels)
    assert sorted(p.name for p in scifact_dir.iterdir()) == ["corpus.jsonl"]
    got = list(pairs_from_beir([scifact_dir]))  # a folder works as well as its corpus.jsonl
    assert got == pairs
    assert len({p.id for p in got}) == len(got) > 0.9 * N_DOCS
    assert all(p.id.startswith("scifact:") for p in got)
    assert all(p.text.strip() and p.next_text.strip() for p in got)

    # Exactly llara.split_pairs over the indexed content (title + text) of each document.
    corpus = beir.load_corpus(scifact_dir / "corpus.jsonl")
    want = [
        Pair(f"scifact:{i}", *h)
        for i, c in zip(corpus.ids, corpus.contents(), strict=True)
        if (h := split_pairs(c)) is not None
    ]
    assert got == want

    with pytest.raises(ValueError, match="collide"):
        list(pairs_from_beir([scifact_dir, scifact_dir / "corpus.jsonl"]))


# --------------------------------------------------------------------------- sharding


def test_shard_assignment_is_a_stable_partition(pairs):
    ids = [p.id for p in pairs]
    a = {i: shard_of(i, 4, seed=0) for i in ids}
    assert set(a.values()) == {0, 1, 2, 3}
    shuffled = ids[::-1]
    assert {i: shard_of(i, 4, seed=0) for i in shuffled} == a
    assert shard_of("scifact:4983", 4, 0) == a["scifact:4983"]  # a pure function of (id, n, seed)
    b = {i: shard_of(i, 4, seed=1) for i in ids}
    assert sum(a[i] != b[i] for i in ids) > len(ids) // 2
    with pytest.raises(ValueError):
        shard_of("x", 0, 0)


@pytest.mark.slow
def test_shards_cover_every_pair_once(pairs, tok, tmp_path):
    n, seed, cap = 4, 7, 32
    stats = [tokenize_shard(pairs, s, n, seed, tok, cap, tmp_path / f"s{s}.safetensors") for s in range(n)]
    assert sum(s["pairs"] for s in stats) == len(pairs)
    assert all(s["seen"] == len(pairs) and s["skipped_empty"] == 0 for s in stats)
    got = sorted(item for s in range(n) for item in map(_as_tuples, load_shard(tmp_path / f"s{s}.safetensors")))
    want = sorted((tuple(_ids(tok, p.text, cap)), tuple(_ids(tok, p.next_text, cap))) for p in pairs)
    assert got == want
    # Each file holds exactly the pairs hashed to it, in the promised order.
    for s in range(n):
        mine = [p for p in pairs if shard_of(p.id, n, seed) == s]
        order = _shard_order(mine, seed, s)
        meta = load_shard(tmp_path / f"s{s}.safetensors").metadata
        assert meta["ids_sha256"] == hashlib.sha256(b"".join(i.encode() + b"\n" for i in order)).hexdigest()
        assert meta["num_pairs"] == str(len(mine)) and meta["shard"] == str(s) and meta["seed"] == str(seed)


def _as_tuples(item):
    return tuple(item[0]), tuple(item[1])


@pytest.mark.slow
def test_shard_files_are_deterministic(pairs, tok, tmp_path):
    a, b, c, d = (tmp_path / f"{x}.safetensors" for x in "abcd")
    tokenize_shard(pairs, 1, 3, 0, tok, 24, a)
    tokenize_shard(pairs, 1, 3, 0, tok, 24, b)
    tokenize_shard(reversed(pairs), 1, 3, 0, tok, 24, c)  # input order does not matter
    tokenize_shard(pairs, 1, 3, 1, tok, 24, d)
    assert a.read_bytes() == b.read_bytes() == c.read_bytes()
    assert a.read_bytes() != d.read_bytes()
    # The metadata header is canonical (sorted keys), not in safetensors' random HashMap order.
    raw = a.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n].decode()
    meta = json.loads(header)["__metadata__"]
    assert list(meta) == sorted(meta)
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


@pytest.mark.slow
def test_roundtrip_and_truncation(pairs, tok, tmp_path):
    cap, seed = 16, 3
    path = tmp_path / "all.safetensors"
    stats = tokenize_shard(pairs, 0, 1, seed, tok, cap, path)
    shard = load_shard(path)
    assert len(shard) == stats["pairs"] == len(pairs)
    by_id = {p.id: p for p in pairs}
    for i, pid in enumerate(_shard_order(pairs, seed, 0)):
        text_ids, next_ids = shard[i]
        assert text_ids == _ids(tok, by_id[pid].text, cap)
        assert next_ids == _ids(tok, by_id[pid].next_text, cap)
    assert shard[-1] == shard[len(shard) - 1]
    with pytest.raises(IndexError):
        shard[len(shard)]
    assert max(len(shard[i][0]) for i in range(len(shard))) == cap  # SciFact halves are longer than 16 tokens
    assert stats["text_tokens"] == sum(len(shard[i][0]) for i in range(len(shard)))
    assert stats["next_tokens"] == sum(len(shard[i][1]) for i in range(len(shard)))
    assert shard.metadata["max_text_length"] == str(cap)
    assert shard.metadata["tokenizer"] == str(tok.name_or_path)


@pytest.mark.slow
def test_empty_shard_and_duplicate_ids(pairs, tok, tmp_path):
    stats = tokenize_shard([], 0, 2, 0, tok, 8, tmp_path / "empty.safetensors")
    assert stats["pairs"] == 0 and len(load_shard(tmp_path / "empty.safetensors")) == 0
    dup = [pairs[0], pairs[1], pairs[0]]
    s = shard_of(pairs[0].id, 1, 0)
    with pytest.raises(ValueError, match="twice"):
        tokenize_shard(dup, s, 1, 0, tok, 8, tmp_path / "dup.safetensors")
    assert not (tmp_path / "dup.safetensors").exists()


@pytest.mark.slow
def test_manifest_and_dataset(pairs, tok, tmp_path):
    n, seed = 3, 5
    paths = [tmp_path / "shards" / f"{s}.safetensors" for s in range(n)]
    stats = [tokenize_shard(pairs, s, n, seed, tok, 20, p) for s, p in enumerate(paths)]
    man_path = tmp_path / "manifest.json"
    written = write_manifest(list(reversed(paths)), man_path)
    man = read_manifest(man_path)
    assert man["totals"] == written["totals"]
    for k in ("pairs", "text_tokens", "next_tokens"):
        assert man["totals"][k] == sum(s[k] for s in stats) == sum(e[k] for e in man["shards"])
    assert [e["path"] for e in man["shards"]] == [p.resolve() for p in paths]
    assert man["complete"] and man["settings"]["seed"] == str(seed)

    ds = ShardDataset.from_manifest(man_path)
    assert len(ds) == len(pairs)
    flat = [item for p in paths for item in (load_shard(p)[i] for i in range(len(load_shard(p))))]
    assert [ds[i] for i in range(len(ds))] == flat
    assert ds[-1] == flat[-1]

    with pytest.raises(ValueError, match=r"shards \[1\] of 3 are missing"):
        write_manifest([paths[0], paths[2]], tmp_path / "partial.json")
    other = tmp_path / "other.safetensors"
    tokenize_shard(pairs, 1, n, seed + 1, tok, 20, other)
    with pytest.raises(ValueError, match="seed"):
        write_manifest([paths[0], other, paths[2]], tmp_path / "mixed.json")
    with pytest.raises(ValueError, match="given twice"):
        write_manifest([paths[0], paths[0], paths[1], paths[2]], tmp_path / "twice.json")
    assert not (tmp_path / "mixed.json").exists()

    ds.check_compatible(tok, LlaraObjective(max_text_length=20))
    with pytest.raises(ValueError, match="max_text_length"):
        ds.check_compatible(tok, LlaraObjective(max_text_length=21))


@pytest.mark.slow
def test_shards_are_read_lazily_with_the_same_items(pairs, tok, tmp_path):
    """A shard in memory is its offsets (8 bytes a pair per side); token ids are sliced out of
    the file per item, and equal the rows of the fully loaded arrays. A dataset pickles
    without its open file (DataLoader workers started by spawn open their own)."""
    import pickle

    paths = [tmp_path / f"s{s}.safetensors" for s in range(2)]
    for s, p in enumerate(paths):
        tokenize_shard(pairs, s, 2, 0, tok, 24, p)
    ds = ShardDataset(paths)
    held = [v for shard in ds.shards for v in vars(shard).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in held) == 8 * 2 * (len(ds) + len(paths))  # offsets only
    want = []
    for p in paths:
        a = load_file(p)
        for i in range(len(a["text_offsets"]) - 1):
            t = a["text_ids"][a["text_offsets"][i] : a["text_offsets"][i + 1]].tolist()
            x = a["next_ids"][a["next_offsets"][i] : a["next_offsets"][i + 1]].tolist()
            want.append((t, x))
    assert [ds[i] for i in range(len(ds))] == want and len(want) == len(pairs)
    copy = pickle.loads(pickle.dumps(ds))
    assert [copy[i] for i in (0, len(ds) // 2, -1)] == [want[0], want[len(ds) // 2], want[-1]]


@pytest.mark.slow
def test_corrupt_shards_are_refused(pairs, tok, tmp_path):
    good = tmp_path / "good.safetensors"
    tokenize_shard(pairs[:20], 0, 1, 0, tok, 8, good)
    raw = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated.safetensors"):
        load_shard(truncated)
    header_cut = tmp_path / "header_cut.safetensors"
    header_cut.write_bytes(raw[:40])
    with pytest.raises(ValueError, match="header_cut.safetensors"):
        load_shard(header_cut)

    arrays = load_file(good)
    meta = load_shard(good).metadata

    no_key = tmp_path / "no_key.safetensors"
    save_file({k: v for k, v in arrays.items() if k != "next_offsets"}, no_key, metadata=meta)
    with pytest.raises(ValueError, match=r"no_key.safetensors.*next_offsets"):
        load_shard(no_key)

    no_meta = tmp_path / "no_meta.safetensors"
    save_file(arrays, no_meta, metadata={k: v for k, v in meta.items() if k != "num_pairs"})
    with pytest.raises(ValueError, match=r"no_meta.safetensors.*num_pairs"):
        load_shard(no_meta)

    bad_offsets = tmp_path / "bad_offsets.safetensors"
    broken = dict(arrays, text_offsets=arrays["text_offsets"].copy())
    broken["text_offsets"][-1] += 1
    save_file(broken, bad_offsets, metadata=meta)
    with pytest.raises(ValueError, match=r"bad_offsets.safetensors.*text_offsets"):
        load_shard(bad_offsets)

    wrong_count = tmp_path / "wrong_count.safetensors"
    save_file(arrays, wrong_count, metadata=dict(meta, num_pairs="19"))
    with pytest.raises(ValueError, match="wrong_count.safetensors"):
        load_shard(wrong_count)

    wrong_dtype = tmp_path / "wrong_dtype.safetensors"
    save_file(dict(arrays, text_ids=arrays["text_ids"].astype(np.int64)), wrong_dtype, metadata=meta)
    with pytest.raises(ValueError, match="wrong_dtype.safetensors"):
        load_shard(wrong_dtype)


# --------------------------------------------------------------------------- training batch


@pytest.fixture(scope="module")
def tiny_lm(smollm2_dir):
    """SmolLM2's architecture and vocabulary at toy width: checks that the model accepts the batch, quickly."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(smollm2_dir)
    cfg.update(
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)


@pytest.mark.slow
def test_collate_feeds_llara(pairs, tok, tiny_lm, tmp_path):
    cap, seed = 16, 0
    path = tmp_path / "s.safetensors"
    tokenize_shard(pairs, 0, 1, seed, tok, cap, path)
    ds = ShardDataset([path])
    obj = LlaraObjective(max_text_length=cap)
    vocab = tiny_lm.config.vocab_size
    items = [ds[i] for i in range(4)]
    batch = collate(tok, obj, vocab)(items)

    B, L = batch.input_ids.shape
    assert B == 4 and batch.attention_mask.shape == (B, 1, L, L) and batch.position_ids.shape == (B, L)
    assert batch.ebae_targets.shape == batch.ebar_targets.shape == (B, vocab)
    rows = torch.arange(B)
    assert (batch.input_ids[rows, batch.ebae_index] == tok.eos_token_id).all()
    assert (batch.input_ids[rows, batch.ebar_index] == tok.eos_token_id).all()
    assert (batch.segments[rows, batch.ebae_index] == SELF).all()
    assert (batch.segments[rows, batch.ebar_index] == NEXT).all()
    assert batch.text_ids == [t for t, _ in items]

    # Identical to the batch built from the original strings: nothing lost by pre-tokenising.
    by_id = {p.id: p for p in pairs}
    order = _shard_order(pairs, seed, 0)[:4]
    ref = build_training_batch(tok, [by_id[i].text for i in order], [by_id[i].next_text for i in order], vocab, obj)
    for k in (
        "input_ids",
        "attention_mask",
        "position_ids",
        "ebae_index",
        "ebar_index",
        "ebae_targets",
        "ebar_targets",
    ):
        assert torch.equal(getattr(batch, k), getattr(ref, k)), k

    out = LlaraModel(tiny_lm, obj)(batch)
    assert out["ebae_emb"].shape == out["ebar_emb"].shape == (B, tiny_lm.config.hidden_size)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate(tok, obj, vocab))
    assert sum(b.input_ids.shape[0] for b in loader) == len(ds)
