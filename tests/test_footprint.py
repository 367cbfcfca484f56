"""Index-size, quantization and training table rows from the files the workflow writes."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from llmret.results import footprint
from llmret.retrieval import faiss_index, sparse_index


def test_sparse_index_entry_counts_every_file_and_terms_per_document(tmp_path):
    docs = sp.csr_matrix(np.array([[0, 1.5, 0, 2.0], [0.5, 0, 0, 0], [0, 0, 3.0, 1.0]], dtype=np.float32))
    index = sparse_index.build_sparse_index(docs, ["d1", "d2", "d3"])
    sparse_index.write_sparse_index(index, tmp_path / "sparse")
    row = footprint.index_entry("sp", "sparse", "scifact", tmp_path / "sparse")
    on_disk = sum(p.stat().st_size for p in (tmp_path / "sparse").iterdir())
    assert row == {
        "system": "sp",
        "type": "sparse",
        "dataset": "scifact",
        "engine": "exact",
        "documents": 3,
        "dim_or_nnz_per_doc": round(5 / 3, 1),
        "index_mb": round(on_disk / 1e6, 3),
    }


def test_dense_index_entry_reads_faiss_header(tmp_path):
    vectors = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    faiss_index.write_index(faiss_index.build_index(vectors, faiss_index.IndexSpec()), tmp_path / "faiss.index")
    row = footprint.index_entry("d", "dense", "scifact", tmp_path / "faiss.index")
    assert (row["engine"], row["documents"], row["dim_or_nnz_per_doc"]) == ("faiss IndexFlatIP", 50, 16.0)
    assert row["index_mb"] == round((tmp_path / "faiss.index").stat().st_size / 1e6, 3)
    with pytest.raises(ValueError, match="bm25"):
        footprint.index_entry("x", "bm25", "scifact", tmp_path / "faiss.index")


def test_dense_exact_search_entry_measures_the_stored_vectors(tmp_path):
    """Exact search has no FAISS file: its index is the shards' vectors, float16 here."""
    vectors = np.random.default_rng(0).standard_normal((50, 16)).astype(np.float32)
    paths = []
    for i, rows in enumerate(((0, 20), (20, 50))):
        paths.append(tmp_path / f"{i}.npy")
        faiss_index.save_embeddings(
            vectors[slice(*rows)], ["d"] * (rows[1] - rows[0]), paths[-1], tmp_path / f"{i}.ids", dtype="float16"
        )
    row = footprint.index_entry("d", "dense", "scifact", paths)
    assert (row["engine"], row["documents"], row["dim_or_nnz_per_doc"]) == ("exact", 50, 16.0)
    assert row["index_mb"] == round(sum(p.stat().st_size for p in paths) / 1e6, 3)
    assert sum(p.stat().st_size for p in paths) == 50 * 16 * 2 + 2 * 128  # float16 and two .npy headers


def test_quantization_rows_and_missing_metric(tmp_path):
    (tmp_path / "idx").write_bytes(b"x" * 2_000_000)
    stats = {
        "precision": "int8",
        "head_precision": "float32",
        "weight_bytes": 150_000_000,
        "texts_per_second": 12.5,
        "device": "cpu",
    }
    metrics = {"metrics": {"ndcg@10": 0.51234567}}
    row = footprint.quantization_entry("s-int8", stats, tmp_path / "idx", metrics, "scifact", "ndcg@10")
    table = footprint.quantization_table([row], "ndcg@10")
    assert list(table.columns) == [*footprint.QUANT_COLUMNS, "ndcg@10"]
    assert table.iloc[0].to_dict() == {
        "system": "s-int8",
        "precision": "int8",
        "head_precision": "float32",
        "weights_mb": 150.0,
        "encode_texts_per_s": 12.5,
        "device": "cpu",
        "index_mb": 2.0,
        "dataset": "scifact",
        "ndcg@10": 0.5123,
    }
    with pytest.raises(ValueError, match=r"s-int8 on scifact: no 'map'"):
        footprint.quantization_entry("s-int8", stats, tmp_path / "idx", metrics, "scifact", "map")
    footprint.tradeoff_plot(table, tmp_path / "plot.png", "ndcg@10")
    assert (tmp_path / "plot.png").stat().st_size > 1000
    json.dumps(row)  # plain values only (written as CSV and JSON)
    assert isinstance(table, pd.DataFrame)


def test_training_rows_from_training_state(tmp_path):
    gpu, cpu, broken = tmp_path / "gpu-run", tmp_path / "old-run", tmp_path / "broken"
    for d in (gpu, cpu, broken):
        d.mkdir()
    (gpu / "training_state.json").write_text(
        json.dumps(
            {
                "steps": 100,
                "train_time_s": 250.04,
                "final_loss": 0.123456,
                "world_size": 2,
                "device": "cuda:0",
                "resumed_from_step": 50,
                "peak_memory_mb": {"host_rss_mb": 3456.78, "device_allocated_mb": 12345.67, "device_reserved_mb": 1e4},
            }
        )
    )
    # Written before the loop recorded memory and device: those cells stay empty.
    (cpu / "training_state.json").write_text(json.dumps({"steps": 3, "train_time_s": 9.0, "final_loss": None}))
    (broken / "training_state.json").write_text(json.dumps({"steps": 3}))
    rows = [
        footprint.training_entry("ft", "finetuning", "llara", gpu),
        footprint.training_entry("pt", "pretraining", "smollm2", cpu),
    ]
    table = footprint.training_table(rows)
    assert list(table.columns) == footprint.TRAINING_COLUMNS
    assert rows[0] == {
        "run": "ft",
        "stage": "finetuning",
        "base_model": "llara",
        "steps": 100,
        "world_size": 2,
        "device": "cuda:0",
        "train_time_s": 250.0,
        "s_per_step": 2.5,
        "peak_host_rss_mb": 3456.8,
        "peak_device_mb": 12345.7,
        "final_loss": 0.1235,
        "resumed_from_step": 50,
    }
    assert rows[1]["s_per_step"] == 3.0
    assert (rows[1]["peak_host_rss_mb"], rows[1]["peak_device_mb"], rows[1]["device"]) == (None, None, None)
    with pytest.raises(ValueError, match=r"broken/training_state.json: not a training state \(KeyError"):
        footprint.training_entry("b", "finetuning", "x", broken)
    with pytest.raises(FileNotFoundError, match=r"nope: .*missing/training_state.json is missing"):
        footprint.training_entry("nope", "finetuning", "x", tmp_path / "missing")
