"""LLaRA pretraining data written as reproducible token shards: each pair assigned to a shard
by a stable hash, each shard tokenised by its own job and written as a safetensors file whose
bytes depend only on the set of pairs. Reading shards back (one file, the manifest, the
training dataset) is :mod:`llmret.llara.shard_dataset`.

Design notes: docs/llara.md.
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
import random
import struct
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from llmret.atomic_files import atomic_publish
from llmret.llara.pairs import Pair

PathLike = str | os.PathLike[str]

# The shard format: what tokenize_shard writes and llmret.llara.shard_dataset checks on reading.
FORMAT = "llmret.pretrain-shard/1"
ARRAYS = {"text_ids": np.int32, "next_ids": np.int32, "text_offsets": np.int64, "next_offsets": np.int64}
METADATA_KEYS = (
    "format",
    "num_pairs",
    "shard",
    "num_shards",
    "seed",
    "tokenizer",
    "tokenizer_vocab_sha256",
    "max_text_length",
    "ids_sha256",
    "text_tokens",
    "next_tokens",
)
TOKENIZE_BATCH = 1024

# id -> (text token ids, next-text token ids) of the pairs a shard keeps
TokenisedPairs = dict[str, tuple[np.ndarray, np.ndarray]]


# --------------------------------------------------------------------------- sharding


def shard_of(pair_id: str, num_shards: int, seed: int) -> int:
    """Shard of a pair: sha256 of (seed, id) modulo ``num_shards``.

    hashlib rather than :func:`hash`, which is salted per process: every shard job must
    agree on the assignment, whatever order it reads the pairs in.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    digest = hashlib.sha256(f"{seed}\x00{pair_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, added tokens included).

    ``name_or_path`` is a machine-specific path; this tells whether two tokenizers map text to
    the same ids, which is what a shard's meaning depends on. Cached per tokenizer object and
    vocabulary size (adding tokens changes the size), since hashing 50k entries is not free.
    """
    size = len(tokenizer)
    try:
        cached = _FINGERPRINTS.get(tokenizer)
    except TypeError:  # not weak-referenceable: just compute
        cached = None
    if cached is not None and cached[0] == size:
        return cached[1]
    vocab = sorted(tokenizer.get_vocab().items(), key=operator.itemgetter(1, 0))
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    try:
        _FINGERPRINTS[tokenizer] = (size, digest)
    except TypeError:
        pass
    return digest


# --------------------------------------------------------------------------- tokenising one shard


def tokenize_shard(
    pairs: Iterable[Pair],
    shard: int,
    num_shards: int,
    seed: int,
    tokenizer,
    max_text_length: int,
    out_path: PathLike,
) -> dict[str, int]:
    """Tokenise the pairs of one shard and write them to ``out_path`` (atomically).

    Pairs of other shards are skipped unread beyond their id, so N jobs each scan the whole
    source and together tokenise it once. Texts are tokenised without special tokens and cut
    to ``max_text_length`` tokens (the objective adds prompts/EOS itself); pairs with an empty
    side after tokenisation are dropped. The kept pairs are sorted by id and then shuffled with
    ``random.Random(f"{seed}-{shard}")``, so the file depends on the set of pairs, not on the
    order the source yields them. A repeated id is an error: it would otherwise be trained on
    twice (the same id always hashes to the same shard, so this check is global).

    Returns ``{"pairs", "text_tokens", "next_tokens", "seen", "skipped_empty"}``.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in [0, {num_shards}), got {shard}")
    if max_text_length < 1:
        raise ValueError(f"max_text_length must be >= 1, got {max_text_length}")
    mine, seen, skipped = _tokenize_pairs_of_shard(pairs, shard, num_shards, seed, tokenizer, max_text_length)
    ids = sorted(mine)
    random.Random(f"{seed}-{shard}").shuffle(ids)
    tensors = _shard_arrays(mine, ids)
    stats = {
        "pairs": len(ids),
        "text_tokens": int(tensors["text_offsets"][-1]),
        "next_tokens": int(tensors["next_offsets"][-1]),
        "seen": seen,
        "skipped_empty": skipped,
    }
    metadata = {
        "format": FORMAT,
        "num_pairs": str(len(ids)),
        "shard": str(shard),
        "num_shards": str(num_shards),
        "seed": str(seed),
        "tokenizer": str(getattr(tokenizer, "name_or_path", "")),
        "tokenizer_vocab_sha256": tokenizer_fingerprint(tokenizer),
        "max_text_length": str(max_text_length),
        "ids_sha256": _ids_sha256(ids),
        "text_tokens": str(stats["text_tokens"]),
        "next_tokens": str(stats["next_tokens"]),
    }
    _write_shard(tensors, metadata, Path(out_path))
    return stats


def _tokenize_pairs_of_shard(
    pairs: Iterable[Pair], shard: int, num_shards: int, seed: int, tokenizer, max_len: int
) -> tuple[TokenisedPairs, int, int]:
    """(the shard's kept pairs, pairs seen in the source, pairs dropped for an empty side).

    The shard's pairs are tokenised ``TOKENIZE_BATCH`` at a time (a fast tokenizer's batch call
    is much quicker than one call a text), so memory holds one batch of texts at most.
    """
    mine: TokenisedPairs = {}
    pending: list[Pair] = []
    taken: set[str] = set()
    seen = skipped = 0
    for pair in pairs:
        seen += 1
        if shard_of(pair.id, num_shards, seed) != shard:
            continue
        if pair.id in taken:
            raise ValueError(f"pair id {pair.id!r} occurs twice in the source")
        taken.add(pair.id)
        pending.append(pair)
        if len(pending) >= TOKENIZE_BATCH:
            skipped += _tokenize_batch(tokenizer, pending, max_len, mine)
            pending = []
    skipped += _tokenize_batch(tokenizer, pending, max_len, mine)
    return mine, seen, skipped


def _tokenize_batch(tokenizer, batch: Sequence[Pair], max_len: int, into: TokenisedPairs) -> int:
    """Add the token ids of ``batch``'s pairs to ``into``; returns how many were dropped
    because a side is empty after tokenisation (nothing to embed, or nothing to predict)."""
    if not batch:
        return 0
    texts = _token_ids(tokenizer, [p.text for p in batch], max_len)
    nexts = _token_ids(tokenizer, [p.next_text for p in batch], max_len)
    skipped = 0
    for p, t, n in zip(batch, texts, nexts, strict=True):
        if not t or not n:
            skipped += 1
            continue
        into[p.id] = (np.asarray(t, dtype=np.int32), np.asarray(n, dtype=np.int32))
    return skipped


def _token_ids(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """Ids as :func:`llara.build_training_batch` computes them: no special tokens, then cut."""
    return [list(ids[:max_len]) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# --------------------------------------------------------------------------- the shard file


def _shard_arrays(mine: TokenisedPairs, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """The pairs in ``ids`` order as two CSR layouts (ids and offsets for texts and next texts)."""
    text_ids, text_offsets = _csr([mine[i][0] for i in ids])
    next_ids, next_offsets = _csr([mine[i][1] for i in ids])
    return {"text_ids": text_ids, "text_offsets": text_offsets, "next_ids": next_ids, "next_offsets": next_offsets}


def _csr(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows], dtype=np.int64)
    flat = np.concatenate(rows).astype(np.int32) if rows else np.zeros(0, dtype=np.int32)
    return flat, offsets


def _ids_sha256(ids: Sequence[str]) -> str:
    """sha256 of the pair ids in file order, one a line: the manifest compares shards by it."""
    ids_hash = hashlib.sha256()
    for i in ids:
        ids_hash.update(i.encode() + b"\n")
    return ids_hash.hexdigest()


def _write_shard(tensors: dict[str, np.ndarray], metadata: dict[str, str], out_path: Path) -> None:
    """Publish the shard atomically, its header canonical so equal shards are equal bytes."""

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        _canonical_header(tmp)

    atomic_publish(write, out_path)


def _canonical_header(path: Path) -> None:
    """Rewrite the safetensors JSON header with sorted keys, in place.

    safetensors keeps metadata in a Rust HashMap whose order is random per process, which
    would make identical shards differ in bytes. Sorting changes no value, and the data
    offsets are relative to the end of the header, so only the header bytes move.
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        canon = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canon) > n:  # cannot happen for the same JSON re-serialised compactly; refuse rather than corrupt
            raise RuntimeError(f"{path}: canonical safetensors header is longer than the original")
        f.seek(8)
        f.write(canon + b" " * (n - len(canon)))


__all__ = ["FORMAT", "shard_of", "tokenize_shard", "tokenizer_fingerprint"]
