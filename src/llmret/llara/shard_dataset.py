"""LLaRA pretraining shards read back for training: one shard file opened lazily and
validated, the manifest checking the shards were made together, and the dataset and collator
the pretraining stage trains on. Writing shards is :mod:`llmret.llara.pretrain_shards`.

Design notes: docs/llara.md.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from llmret.atomic_files import atomic_publish, file_sha256
from llmret.llara.objective import JointBatch, LlaraObjective, build_training_batch
from llmret.llara.pretrain_shards import ARRAYS, FORMAT, METADATA_KEYS, PathLike, tokenizer_fingerprint

# --------------------------------------------------------------------------- reading shards


# safetensors' dtype names of the arrays a shard holds
_SAFETENSORS_DTYPES = {"I32": np.int32, "I64": np.int64}


class TokenShard:
    """One shard, read lazily: pair i is ``text_ids[text_offsets[i]:text_offsets[i+1]]`` and
    likewise for next. The offsets (8 bytes a pair) are in memory; the token ids stay in the
    file and each item slices its own rows out of it (safetensors ``get_slice`` over a
    memory map), so what a rank holds does not grow with the corpus. Shards are written once
    and published atomically (a new shard replaces the file; an open map keeps the old one)."""

    def __init__(self, path: Path, metadata: dict[str, str], text_offsets: np.ndarray, next_offsets: np.ndarray):
        self.path, self.metadata = path, metadata
        self.text_offsets, self.next_offsets = text_offsets, next_offsets
        self._file = None  # safe_open handle, opened on first use (in each DataLoader worker)

    def __len__(self) -> int:
        return len(self.text_offsets) - 1

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_file": None}  # a worker started by spawn opens its own

    def _rows(self, name: str, start: int, stop: int) -> list[int]:
        if self._file is None:
            self._file = safe_open(str(self.path), framework="np")
        return self._file.get_slice(name)[start:stop].tolist()

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair {i} out of range for {self.path} ({n} pairs)")
        i %= n
        t = self._rows("text_ids", int(self.text_offsets[i]), int(self.text_offsets[i + 1]))
        x = self._rows("next_ids", int(self.next_offsets[i]), int(self.next_offsets[i + 1]))
        return t, x

    @property
    def max_text_length(self) -> int:
        return int(self.metadata["max_text_length"])


def _check_offsets(path: Path, name: str, offsets: np.ndarray, tokens: int, n: int) -> None:
    if offsets.shape != (n + 1,):
        raise ValueError(f"{path}: {name} has shape {offsets.shape}, expected ({n + 1},) for {n} pairs")
    if offsets[0] != 0 or offsets[-1] != tokens or (np.diff(offsets) < 0).any():
        raise ValueError(f"{path}: {name} is not a valid CSR offset array over {tokens} tokens")


def load_shard(path: PathLike) -> TokenShard:
    """Open and validate a shard (header, offsets, the token arrays' dtype and length; the ids
    themselves are read per item); anything truncated, missing or inconsistent is a ValueError
    naming the file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
            keys = set(f.keys())
            missing = [k for k in ARRAYS if k not in keys]
            if missing:
                raise ValueError(f"{path}: not a pretraining shard, missing arrays {missing}")
            layout = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in ARRAYS}
            for k, dtype in ARRAYS.items():
                got, shape = layout[k]
                if _SAFETENSORS_DTYPES.get(got) is not dtype or len(shape) != 1:
                    raise ValueError(f"{path}: {k} is {got} with shape {shape}, expected 1-D {np.dtype(dtype)}")
            offsets = {k: f.get_tensor(k) for k in ("text_offsets", "next_offsets")}
    except SafetensorError as e:
        raise ValueError(f"{path}: unreadable safetensors file ({e})") from None
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise ValueError(f"{path}: not a pretraining shard, missing metadata {missing}")
    if metadata["format"] != FORMAT:
        raise ValueError(f"{path}: format {metadata['format']!r}, expected {FORMAT!r}")
    try:
        n = int(metadata["num_pairs"])
    except ValueError:
        raise ValueError(f"{path}: num_pairs {metadata['num_pairs']!r} is not an integer") from None
    for side in ("text", "next"):
        _check_offsets(path, f"{side}_offsets", offsets[f"{side}_offsets"], layout[f"{side}_ids"][1][0], n)
    return TokenShard(path, metadata, offsets["text_offsets"], offsets["next_offsets"])


# --------------------------------------------------------------------------- manifest


SHARED_SETTINGS = ("num_shards", "seed", "tokenizer_vocab_sha256", "max_text_length", "format")


def write_manifest(
    shard_paths: Sequence[PathLike], out_path: PathLike, require_complete: bool = True
) -> dict[str, Any]:
    """Summarise shards in a JSON file (atomic): per-shard pairs/tokens/sha256 and totals.

    All shards must come from one run (same num_shards, seed, tokenizer vocabulary,
    max_text_length) with no shard twice; with ``require_complete`` every shard index must be
    present, so the training stage cannot silently train on part of the data. Paths are
    stored relative to the manifest so the folder can move.
    """
    out_path = Path(out_path)
    if not shard_paths:
        raise ValueError("no shards")
    entries: list[dict[str, Any]] = []
    settings: dict[str, str] | None = None
    first: Path | None = None
    tokenizer_name = ""
    by_index: dict[int, Path] = {}
    for p in shard_paths:
        path = Path(p)
        shard = load_shard(path)
        meta = shard.metadata
        mine = {k: meta[k] for k in SHARED_SETTINGS}
        if settings is None:
            settings, first, tokenizer_name = mine, path, meta["tokenizer"]
        elif mine != settings:
            diff = sorted(k for k in SHARED_SETTINGS if mine[k] != settings[k])
            raise ValueError(f"{path}: made with different {diff} than {first}")
        idx = int(meta["shard"])
        if idx in by_index:
            raise ValueError(f"shard {idx} given twice: {by_index[idx]} and {path}")
        by_index[idx] = path
        entries.append(
            {
                "path": os.path.relpath(path.resolve(), out_path.parent.resolve()),
                "shard": idx,
                "pairs": len(shard),
                "text_tokens": int(shard.text_offsets[-1]),
                "next_tokens": int(shard.next_offsets[-1]),
                "ids_sha256": meta["ids_sha256"],
                "sha256": file_sha256(path),
            }
        )
    assert settings is not None
    num_shards = int(settings["num_shards"])
    absent = sorted(set(range(num_shards)) - set(by_index))
    if require_complete and absent:
        raise ValueError(f"shards {absent} of {num_shards} are missing")
    entries.sort(key=lambda e: e["shard"])
    manifest = {
        "format": "llmret.pretrain-manifest/1",
        "settings": {**settings, "tokenizer": tokenizer_name},
        "complete": not absent,
        "shards": entries,
        "totals": {k: sum(e[k] for e in entries) for k in ("pairs", "text_tokens", "next_tokens")},
    }
    atomic_publish(
        lambda tmp: tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"), out_path
    )
    return manifest


def read_manifest(path: PathLike) -> dict[str, Any]:
    """Load a manifest, check totals, and resolve shard paths to absolute ``Path`` objects."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        shards = manifest["shards"]
        totals = manifest["totals"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a pretraining manifest ({e})") from None
    for k in ("pairs", "text_tokens", "next_tokens"):
        if totals.get(k) != sum(e[k] for e in shards):
            raise ValueError(f"{path}: total {k} {totals.get(k)} != sum over shards")
    for e in shards:
        e["path"] = (path.parent / e["path"]).resolve()
    return manifest


# --------------------------------------------------------------------------- training input


class ShardDataset(torch.utils.data.Dataset):
    """Several shards as one dataset: global index -> (text_ids, next_ids).

    Shards are opened (and validated) up front; only their offsets are held, and an item's
    token ids are sliced out of its file when it is asked for (:class:`TokenShard`), so every
    rank's memory stays the same whatever the corpus size.
    """

    def __init__(self, shard_paths: Sequence[PathLike]):
        if not shard_paths:
            raise ValueError("no shards")
        self.shards = [load_shard(p) for p in shard_paths]
        lengths = [len(s) for s in self.shards]
        self._ends = list(np.cumsum(lengths, dtype=np.int64).tolist())
        fingerprints = {s.metadata["tokenizer_vocab_sha256"] for s in self.shards}
        lengths_cap = {s.max_text_length for s in self.shards}
        if len(fingerprints) > 1 or len(lengths_cap) > 1:
            raise ValueError("shards were made with different tokenizers or max_text_length")

    @classmethod
    def from_manifest(cls, manifest_path: PathLike) -> ShardDataset:
        return cls([e["path"] for e in read_manifest(manifest_path)["shards"]])

    def __len__(self) -> int:
        return self._ends[-1]

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"pair {i} out of range ({n} pairs)")
        i %= n
        k = bisect.bisect_right(self._ends, i)
        start = self._ends[k - 1] if k else 0
        return self.shards[k][i - start]

    @property
    def max_text_length(self) -> int:
        return self.shards[0].max_text_length

    @property
    def tokenizer_fingerprint(self) -> str:
        return self.shards[0].metadata["tokenizer_vocab_sha256"]

    def check_compatible(self, tokenizer, objective: LlaraObjective) -> None:
        """Refuse a tokenizer whose ids differ from the shards', or an objective wanting longer texts than stored.

        The fingerprint covers added tokens: shards for a flagembedding objective are made
        after :func:`llara.add_summary_tokens`, and training must add the same tokens first.
        """
        ebae, ebar = objective.summary_names()
        vocab = tokenizer.get_vocab()
        missing = [t for t in ebae + ebar if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the summary tokens {missing}; call llara.add_summary_tokens first")
        if tokenizer_fingerprint(tokenizer) != self.tokenizer_fingerprint:
            raise ValueError(
                "the tokenizer's vocabulary differs from the one the shards were made with "
                "(same base model, and the same summary tokens added?)"
            )
        if objective.max_text_length > self.max_text_length:
            raise ValueError(
                f"objective.max_text_length={objective.max_text_length} but shards hold at most "
                f"{self.max_text_length} tokens per text"
            )


def collate(
    tokenizer, objective: LlaraObjective, vocab_size: int, dtype: torch.dtype = torch.float32
) -> Callable[[Sequence[tuple[Sequence[int], Sequence[int]]]], JointBatch]:
    """A DataLoader ``collate_fn``: (text_ids, next_ids) items -> the batch of :func:`llara.build_training_batch`.

    Token ids go in as they are (``build_training_batch`` accepts id lists), never decoded
    and re-tokenised, so training sees exactly the stored ids.
    """

    def fn(items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> JointBatch:
        if not items:
            raise ValueError("empty batch")
        texts = [list(t) for t, _ in items]
        nexts = [list(n) for _, n in items]
        return build_training_batch(tokenizer, texts, nexts, vocab_size, objective, dtype)

    return fn


__all__ = [
    "ShardDataset",
    "TokenShard",
    "collate",
    "load_shard",
    "read_manifest",
    "write_manifest",
]
