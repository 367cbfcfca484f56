"""Memory requests from the config: the terms grow with what they should and nothing else."""

import pytest

from llmret import sizing

CONFIG = {
    "models": {"big": {"parameters": 7e9, "hidden_size": 4096}, "small": {}},
    "pretraining": {"pt": {"model": "big", "gpus": 8, "training": {}}},
    "finetuning": {"ft": {"model": "pt", "gpus": 8, "training": {"dtype": "float32"}}},
    "systems": {
        "dense": {"type": "dense", "model": "ft", "max_passage_length": 128},
        "sparse": {"type": "sparse", "model": "big", "top_k": 128, "max_passage_length": 128},
        "tiny": {"type": "dense", "model": "small"},
    },
    "datasets": {"ms": {"corpus_size": 9_000_000}, "sub": {"corpus_size": 9_000_000, "subsample": {"max_docs": 1000}}},
    "encoding": {"shard_size": 500_000},
}


def test_a_run_takes_its_base_models_size_and_unknown_models_a_default():
    assert sizing.model_size(CONFIG, "ft") == (7e9, 4096)
    assert sizing.model_size(CONFIG, "small") == (sizing.DEFAULT_PARAMETERS, sizing.DEFAULT_HIDDEN)
    with pytest.raises(KeyError, match="neither a model nor a training run"):
        sizing.model_size(CONFIG, "nope")


def test_requests_grow_with_shards_width_ranks_and_dtype():
    assert sizing.shard_rows(CONFIG, "ms", 18) == 500_000 and sizing.shard_rows(CONFIG, "sub", 1) == 1000
    one, many = sizing.encode_mb(CONFIG, "dense", "ms", 1), sizing.encode_mb(CONFIG, "dense", "ms", 18)
    vectors = 9_000_000 * 4096 * 4 / 2**20
    assert one > vectors and many < one / 4  # a shard's vectors, not the corpus's
    assert sizing.encode_mb(CONFIG, "sparse", "ms", 18) < many  # 256 numbers a passage, not 4,096
    assert sizing.index_mb(CONFIG, "dense", "ms", 18) >= 2 * 500_000 * 4096 * 4 / 2**20
    # bf16 on GPUs (auto) holds half of float32's weights per rank; 8 ranks, 8 copies
    bf16, fp32 = sizing.training_mb(CONFIG, "pt", 8), sizing.training_mb(CONFIG, "ft", 8)
    assert 8 * 7e9 * 2 / 2**20 < bf16 < 8 * 7e9 * 4 / 2**20 < fp32
    assert sizing.training_mb(CONFIG, "pt", 0) < bf16  # CPU: one process
    assert sizing.search_mb(CONFIG, "dense", "ms", 18, 201, train=True) > sizing.search_mb(
        CONFIG, "dense", "ms", 18, 1001, train=False
    )
    assert all(v % 1000 == 0 for v in (one, many, bf16, fp32))
