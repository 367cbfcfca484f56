"""Host memory (mem_mb) a job asks for, from sizes the config knows before anything runs.

A cluster job that asks too little is killed; one that asks too much waits in the queue. So
each memory-bound rule asks for what its biggest structures take, plus a fixed allowance
for the interpreter, torch and the CUDA context, times a headroom. The terms (docs/scale.md
has the derivation):

- encoding a shard: the model's weights at its dtype (loaded on the host first), the
  shard's vectors (float32 rows of ``hidden`` numbers, or ``top_k`` (term, weight) pairs),
  and its token ids as Python lists;
- an ANN FAISS index (ivf/hnsw) of a shard: the shard's vectors twice (the loaded array and
  the index);
- searching: one shard's vectors as float32 (exact search) or its index, plus the running
  top-k of every query;
- training: each rank's copy of the weights at the training dtype.

Model sizes come from ``models.<name>.parameters`` / ``hidden_size`` (a run inherits its
base model's), falling back to a 1B-parameter, 4,096-wide model when the config does not say.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from llmret import registry

MB = 2**20
BASE_BYTES = 3 * 2**30  # interpreter, torch, CUDA context, tokenizer
HEADROOM = 1.25
TOKEN_BYTES = 44  # one token id in a Python list: an int object and its pointer
TEXT_BYTES_PER_TOKEN = 8  # the passage text itself, ~4 characters a token, str overhead
SPARSE_ENTRY_BYTES = 8  # int32 term + float32 weight
TOPK_SLOT_BYTES = 4 + 8 + 8 + 64  # score, tie key, id reference, and the run line written
EVAL_QUERIES = 10_000  # the largest BEIR test query set (Quora); MS MARCO dev has 6,980
TRAIN_QUERIES = 1_000_000  # MS MARCO's 808,731 training queries, rounded up
DEFAULT_PARAMETERS = 1e9
DEFAULT_HIDDEN = 4096
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def mb(nbytes: float) -> int:
    """A request in MB: the bytes plus the fixed allowance, with headroom, rounded up to 1,000."""
    return int(math.ceil((BASE_BYTES + nbytes) * HEADROOM / MB / 1000) * 1000)


def encode_bytes(rows: int, width: int, max_length: int, weight_bytes: float) -> float:
    """Encoding ``rows`` passages into vectors of ``width`` 4-byte numbers (dense: hidden;
    sparse: 2 x top_k for the CSR pairs)."""
    return weight_bytes + rows * (width * 4 + max_length * (TOKEN_BYTES + TEXT_BYTES_PER_TOKEN))


def index_bytes(rows: int, hidden: int) -> float:
    return 2 * rows * hidden * 4


def search_bytes(rows: int, hidden: int, queries: int, k: int) -> float:
    return rows * hidden * 4 + queries * (hidden * 4 + k * TOPK_SLOT_BYTES)


def training_bytes(parameters: float, dtype: str, ranks: int) -> float:
    """Every rank loads the weights on the host before DeepSpeed moves them to its GPU."""
    return max(1, ranks) * (parameters * DTYPE_BYTES[dtype] + BASE_BYTES)


# --------------------------------------------------------------------------- from the config


def base_model(config: Mapping, name: str) -> Mapping:
    """The ``models`` entry a model name or training run comes from (following run bases)."""
    seen = set()
    while name not in (config.get("models") or {}):
        run = next((entry for run, _, entry in registry.runs(config) if run == name), None)
        if run is None or name in seen:
            raise KeyError(f"{name!r} is neither a model nor a training run")
        seen.add(name)
        name = run["model"]
    return config["models"][name]


def model_size(config: Mapping, name: str) -> tuple[float, int]:
    """(parameters, hidden size) of a model or run, from its base model's settings."""
    model = base_model(config, name)
    return float(model.get("parameters") or DEFAULT_PARAMETERS), int(model.get("hidden_size") or DEFAULT_HIDDEN)


def planned_corpus_size(dataset: Mapping) -> int | None:
    """Passages a dataset's corpus is planned to have before it exists: its ``corpus_size``,
    capped by a subsample's ``max_docs``; None when neither is known."""
    sizes = [n for n in (dataset.get("corpus_size"), (dataset.get("subsample") or {}).get("max_docs")) if n]
    return min(sizes) if sizes else None


def shard_rows(config: Mapping, dataset: str, shards: int) -> int:
    """Passages in the largest shard of a dataset's corpus, as planned (a full shard when the
    corpus size is unknown)."""
    from llmret.retrieval.corpus_shards import EncodingSpec

    size = planned_corpus_size(config["datasets"][dataset]) or EncodingSpec.from_config(config).shard_size
    return math.ceil(size / shards)


def encode_mb(config: Mapping, system: str, dataset: str, shards: int) -> int:
    sys_cfg = config["systems"][system]
    parameters, hidden = model_size(config, sys_cfg["model"])
    width = 2 * sys_cfg.get("top_k", 256) if sys_cfg["type"] == "sparse" else hidden
    weights = parameters * DTYPE_BYTES.get(sys_cfg.get("dtype", "float32"), 4)
    length = sys_cfg.get("max_passage_length", 256)
    return mb(encode_bytes(shard_rows(config, dataset, shards), width, length, weights))


def index_mb(config: Mapping, system: str, dataset: str, shards: int) -> int:
    _, hidden = model_size(config, config["systems"][system]["model"])
    return mb(index_bytes(shard_rows(config, dataset, shards), hidden))


def search_mb(config: Mapping, system: str, dataset: str, shards: int, k: int, train: bool) -> int:
    _, hidden = model_size(config, config["systems"][system]["model"])
    queries = TRAIN_QUERIES if train else EVAL_QUERIES
    return mb(search_bytes(shard_rows(config, dataset, shards), hidden, queries, k))


def training_dtype(training: Mapping, ranks: int) -> str:
    """The dtype a run's weights are counted at: its ``dtype``, or for ``auto`` what its
    DeepSpeed JSON's ``bf16``/``fp16`` sections say (as llmret.training.arguments.resolve_dtype
    reads them: cpu.json float32, gpu_zero2_bf16.json bfloat16), and where the JSON leaves it
    open (or is not resolved yet), bfloat16 on GPUs (``ranks`` > 0) and float32 on the CPU."""
    dtype = training.get("dtype", "auto")
    if dtype != "auto":
        return dtype
    path = training.get("deepspeed_config")
    cfg: Mapping = {}
    if path and path != "auto":
        try:
            cfg = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            cfg = {}
    sections = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16"}
    stated = {name: (cfg.get(s) or {}).get("enabled") for s, name in sections.items() if isinstance(cfg.get(s), dict)}
    on = [name for name, enabled in stated.items() if enabled is True]
    if on:
        return on[0]
    if any(enabled is False for enabled in stated.values()):
        return "float32"
    return "bfloat16" if ranks > 0 else "float32"


def training_mb(config: Mapping, run: str, ranks: int) -> int:
    """Every rank's weights at :func:`training_dtype`."""
    parameters, _ = model_size(config, run)
    dtype = training_dtype(registry.run_entry(config, run).get("training") or {}, ranks)
    return mb(training_bytes(parameters, dtype, ranks) - BASE_BYTES)


def import_mb(config: Mapping, model: str) -> int:
    """Converting a checkpoint: the weights as read (float32 at most) and as written."""
    parameters, _ = model_size(config, model)
    dtype = config["models"][model].get("dtype", "float32")
    return mb(parameters * (4 + DTYPE_BYTES[dtype]))


PLANNING_KEYS = ("parameters", "hidden_size")  # model settings read only here
