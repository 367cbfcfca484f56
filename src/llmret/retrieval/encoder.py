"""Encode queries and passages into dense vectors with any HF checkpoint.

Causal LLMs (LLaRA eq. 3): the text goes into a prompt template, an end-of-sequence token
is appended, and the final hidden state at that token is the embedding. Truncation cuts the
*text*, never the template or the EOS, so the pooled token always sees the prompt.
BERT-style encoders use the tokenizer's own special tokens and mean or CLS pooling.

Speed on CPU comes from sorting texts by length into token-budgeted batches (little
padding), ``torch.inference_mode`` and an optional reduced dtype.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from llmret import schema
from llmret.retrieval.pooling import check_pooling, pool
from llmret.retrieval.text_framing import TextFraming
from llmret.retrieval.tokenization import pad_id_of, special_frame, token_batches, tokenize_kind
from llmret.specs import settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
@schema.defaults_from("systems.dense")
class EncoderSpec(TextFraming):
    """How a system turns text into a vector; every field is part of the cache key."""

    pooling: str
    normalize: bool
    batch_tokens: int
    dtype: str
    quantize: str  # llmret.retrieval.quantization
    quantize_group_size: int

    def __post_init__(self) -> None:
        check_pooling(self.pooling)
        super().__post_init__()
        schema.check_bounds(self, "systems.dense")
        check_quantize(self)

    @classmethod
    def from_config(cls, cfg: dict) -> EncoderSpec:
        return settings(cls, cfg, "encoder settings")

    def to_dict(self) -> dict:
        return asdict(self)


def check_quantize(spec) -> None:
    """A quantized encoder starts from float32 weights (quantization picks its own compute
    types), so ``quantize`` with another ``dtype`` is refused rather than silently ignored.
    (The choices and the group size's bound are the schema's: :func:`llmret.schema.check_bounds`.)"""
    if spec.quantize != "none" and spec.dtype != "float32":
        raise ValueError(f"quantize {spec.quantize} needs dtype float32 (the weights it quantizes), got {spec.dtype}")
    if getattr(spec, "quantize_head", False) and spec.quantize == "none":
        raise ValueError("quantize_head needs a quantize precision (int8, int8-dynamic or int4), got quantize none")


def precision_of(spec) -> str:
    """The precision a system encodes at: its quantization, else its dtype."""
    return spec.quantize if spec.quantize != "none" else spec.dtype


def apply_quantization(model: torch.nn.Module, spec, device: str) -> torch.nn.Module:
    """``model`` (float32, on ``device``) with ``spec.quantize`` applied; unchanged for none.
    Only sparse specs have ``quantize_head``: a dense encoder is loaded without an output head."""
    if spec.quantize == "none":
        return model
    from llmret.retrieval.quantization import QuantSpec, quantize_model

    quant = QuantSpec(spec.quantize, spec.quantize_group_size, getattr(spec, "quantize_head", False))
    return quantize_model(model, quant, device=device)


@dataclass(frozen=True)
class EncodeStats:
    """What an encoding job measured: the quantization table's throughput and size columns."""

    texts: int
    seconds: float  # encoding only (not loading the model)
    texts_per_second: float
    precision: str
    weight_bytes: int  # the encoder's weights at that precision
    device: str
    threads: int
    head_precision: str = ""  # the output head's ("" without one: dense encoders, bow)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def measured(
        cls, n: int, seconds: float, precision: str, weight_bytes: int, device: str, head_precision: str = ""
    ) -> EncodeStats:
        """The figures of ``n`` texts encoded in ``seconds`` by this process."""
        return cls(
            texts=n,
            seconds=round(seconds, 3),
            texts_per_second=round(n / seconds, 3) if seconds > 0 else float("inf"),
            precision=precision,
            weight_bytes=weight_bytes,
            device=str(device),
            threads=torch.get_num_threads(),
            head_precision=head_precision,
        )


def timed_encode(encode: Callable[[], T], n: int, spec, model: torch.nn.Module, device: str) -> tuple[T, EncodeStats]:
    """``encode()``'s result and the :class:`EncodeStats` of the call (``n`` texts)."""
    start = time.perf_counter()
    out = encode()
    return out, encode_stats(n, time.perf_counter() - start, spec, model, device)


def encode_stats(n: int, seconds: float, spec, model: torch.nn.Module, device: str) -> EncodeStats:
    from llmret.retrieval.quantization import head_precision, weight_bytes

    return EncodeStats.measured(n, seconds, precision_of(spec), weight_bytes(model), device, head_precision(model))


def read_side(path: str, side: str) -> tuple[list[str], list[str], str]:
    """(ids, texts, kind) of a prepared corpus (``side`` corpus: passages) or query file."""
    from llmret.data import beir

    if side == "corpus":
        corpus = beir.load_corpus(path)
        return list(corpus.ids), corpus.contents(), "passage"
    queries = beir.load_queries(path)
    return list(queries), list(queries.values()), "query"


def read_shard(corpus_path: str, info_path: str, shard: str) -> tuple[list[str], list[str], str]:
    """(ids, texts, "passage") of one corpus shard: its rows of the prepared corpus, whose
    size the prepared dataset's ``dataset.json`` records."""
    import json

    from llmret.data import beir
    from llmret.retrieval.corpus_shards import parse_shard, shard_rows

    n = json.loads(Path(info_path).read_text(encoding="utf-8"))["documents"]
    start, end = shard_rows(n, *parse_shard(shard))
    corpus = beir.corpus_rows(corpus_path, start, end)
    return list(corpus.ids), corpus.contents(), "passage"


def read_job_texts(inputs, wildcards) -> tuple[list[str], list[str], str]:
    """(ids, texts, kind) an encode job reads: its corpus shard (``shard`` wildcard, with the
    prepared corpus and its ``dataset.json`` as inputs ``texts`` and ``info``) or its query side."""
    if "shard" in wildcards.keys():
        return read_shard(inputs.texts, inputs.info, wildcards.shard)
    return read_side(inputs.texts, wildcards.side)


def merge_stats(parts: Sequence[dict]) -> dict:
    """The encoding figures of a whole corpus from its shards': counts and seconds add up,
    throughput is their ratio, means are weighted by texts, maxima are maxima."""
    if not parts:
        raise ValueError("no shard statistics to merge")
    out = dict(parts[0])
    texts = sum(p["texts"] for p in parts)
    for key in ("texts", "seconds", "vectors", "nnz"):
        if key in out:
            out[key] = sum(p[key] for p in parts)
    out["seconds"] = round(out["seconds"], 3)
    out["texts_per_second"] = round(texts / out["seconds"], 3) if out["seconds"] > 0 else float("inf")
    if "nnz_mean" in out:
        out["nnz_mean"] = out["nnz"] / max(1, out["vectors"])
    if "nnz_max" in out:
        out["nnz_max"] = max(p["nnz_max"] for p in parts)
    if "terms_used" in out and len(parts) > 1:  # the shards' counts do not give their union
        del out["terms_used"]
        out["terms_used_max_shard"] = max(p["terms_used"] for p in parts)
    out["shards"] = len(parts)
    return out


def set_threads(threads: int | None) -> None:
    """Intra-op threads for this process (a job's ``threads``); None or 0 leaves torch's choice."""
    if threads:
        torch.set_num_threads(threads)


def device_for(gpus: int) -> str:
    """``cuda`` when the job was given GPUs, ``cpu`` when not. A job given GPUs that sees
    none (no CUDA build, CUDA_VISIBLE_DEVICES empty) fails rather than crawl on the CPU."""
    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the job asked for {gpus} GPU(s) (the system's gpus setting) but torch sees no CUDA device; "
            "set gpus: 0 to encode on the CPU"
        )
    return "cuda"


class TextEncoder:
    """A loaded model plus the spec that says how to feed and pool it."""

    def __init__(self, model_dir: str, spec: EncoderSpec, device: str = "cpu", threads: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        set_threads(threads)
        self.spec = spec
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = getattr(torch, spec.dtype)
        # AutoModel drops the LM head: the vocabulary projection is the costliest layer of a
        # small LLM and dense retrieval never uses it.
        model = AutoModel.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.model = apply_quantization(model, spec, str(self.device))
        self.head, self.tail = special_frame(self.tokenizer)
        eos = self.tokenizer.eos_token_id
        if spec.append_eos and eos is None:
            raise ValueError(f"{model_dir}: append_eos is set but the tokenizer has no eos token")
        self.eos = [eos] if spec.append_eos else []
        self.pad_id = pad_id_of(self.tokenizer)

    def tokenize(self, texts: Sequence[str], kind: str) -> list[list[int]]:
        """Token ids per text: frame + prompt prefix + truncated text + prompt suffix + EOS."""
        return tokenize_kind(self.tokenizer, self.spec, texts, kind, self.head, self.tail)

    def batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """:func:`token_batches` with this encoder's ``batch_tokens``."""
        return token_batches(lengths, self.spec.batch_tokens)

    @torch.inference_mode()
    def embed_ids(self, ids: list[list[int]]) -> torch.Tensor:
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for r, x in enumerate(ids):
            input_ids[r, : len(x)] = torch.tensor(x)
            mask[r, : len(x)] = 1
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
        vec = pool(self.spec.pooling, out.last_hidden_state, mask.to(self.device)).float()
        if self.spec.normalize:
            vec = torch.nn.functional.normalize(vec, dim=-1)
        return vec.cpu()

    def encode(self, texts: Sequence[str], kind: str, show_progress: bool = True) -> np.ndarray:
        """Vectors for ``texts`` in input order, float32, shape (len(texts), hidden)."""
        if not texts:
            raise ValueError("nothing to encode")
        ids = self.tokenize(texts, kind)
        dim = self.model.config.hidden_size
        out = np.empty((len(ids), dim), dtype=np.float32)
        plan = self.batches([len(x) for x in ids])
        with tqdm(
            total=len(ids), desc=f"encode {kind} texts", unit="text", mininterval=5.0, disable=not show_progress
        ) as bar:
            for batch in plan:
                out[batch] = self.embed_ids([ids[i] for i in batch]).numpy()
                bar.update(len(batch))
        return out
