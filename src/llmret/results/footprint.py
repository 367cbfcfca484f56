"""What retrieval costs in bytes and seconds: the index-size, quantization and training tables.

``results/index_sizes.csv`` puts each learned system's index next to the others (CSPLADE's
inverted index beside the dense systems' FAISS indexes, or the stored vectors a dense system
searches exactly, as the CSPLADE paper compares them); ``results/quantization_table.csv``
lists, per system (one encoder at several precisions), the precision, the encoder's weight
size, the corpus encoding throughput, the index size and a retrieval metric;
``results/training_table.csv`` lists each training run (pretraining, fine-tuning,
adaptation, CSPLADE) with its steps, training time and peak memory. Inputs are files the
workflow already writes: the index (a FAISS file, a shard's ``.npy`` vectors that exact
search reads, or a sparse-index folder), the encoding job's statistics JSON, the run's
metrics JSON and a trained model's ``training_state.json``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

MB = 1e6
INDEX_COLUMNS = ["system", "type", "dataset", "engine", "documents", "dim_or_nnz_per_doc", "index_mb"]
TRAINING_COLUMNS = [
    "run",
    "stage",
    "base_model",
    "steps",
    "world_size",
    "device",
    "train_time_s",
    "s_per_step",
    "peak_host_rss_mb",
    "peak_device_mb",
    "final_loss",
    "resumed_from_step",
]
QUANT_COLUMNS = [
    "system",
    "precision",
    "head_precision",
    "weights_mb",
    "encode_texts_per_s",
    "device",
    "index_mb",
    "dataset",
]


def path_bytes(path: str | Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    from llmret.retrieval.sparse_index import index_size_bytes

    path = Path(path)
    return index_size_bytes(path) if path.is_dir() else path.stat().st_size


def _paths(paths: str | Path | Sequence[str | Path]) -> list:
    """One path or a corpus's shard paths, as a list."""
    return [paths] if isinstance(paths, str | Path) else list(paths)


def index_entry(system: str, kind: str, dataset: str, index_paths: str | Path | Sequence[str | Path]) -> dict:
    """One row of the index-size table over a corpus's shards: FAISS index files or the stored
    ``.npy`` vectors that exact search reads (dense), or sparse-index folders; documents and
    bytes add up over the shards."""
    index_paths = _paths(index_paths)
    docs, nnz = 0, 0
    for path in index_paths:
        if kind == "dense" and Path(path).suffix == ".npy":  # exact search: the stored vectors
            import numpy as np

            rows, dim = np.load(path, mmap_mode="r", allow_pickle=False).shape
            engine, width = "exact", float(dim)
            docs += int(rows)
        elif kind == "dense":
            import faiss

            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
            engine, width = f"faiss {type(index).__name__}", float(index.d)
            docs += int(index.ntotal)
        elif kind in ("sparse", "bow"):
            from llmret.retrieval.sparse_index import META_FILE

            meta = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
            engine = meta["engine"]
            docs, nnz = docs + int(meta["n_docs"]), nnz + int(meta["nnz"])
        else:
            raise ValueError(f"{system}: system type {kind!r} has no index to measure")
    if kind != "dense":
        width = round(nnz / max(1, docs), 1)
    return {
        "system": system,
        "type": kind,
        "dataset": dataset,
        "engine": engine,
        "documents": docs,
        "dim_or_nnz_per_doc": width,
        "index_mb": round(sum(path_bytes(p) for p in index_paths) / MB, 3),
    }


def index_sizes_table(rows: Sequence[Mapping]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=INDEX_COLUMNS)


def quantization_entry(
    system: str,
    stats: Mapping,
    index_paths: str | Path | Sequence[str | Path],
    metrics: Mapping,
    dataset: str,
    metric: str,
) -> dict:
    """One row of the quantization table from an encoding job's statistics (``EncodeStats``),
    the index and the run's metrics JSON."""
    if metric not in metrics["metrics"]:
        raise ValueError(f"{system} on {dataset}: no {metric!r} in its metrics ({sorted(metrics['metrics'])})")
    return {
        "system": system,
        "precision": stats["precision"],
        "head_precision": stats["head_precision"],
        "weights_mb": round(stats["weight_bytes"] / MB, 2),
        "encode_texts_per_s": stats["texts_per_second"],
        "device": stats["device"],
        "index_mb": round(sum(path_bytes(p) for p in _paths(index_paths)) / MB, 3),
        "dataset": dataset,
        metric: round(float(metrics["metrics"][metric]), 4),
    }


def quantization_table(rows: Sequence[Mapping], metric: str) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=[*QUANT_COLUMNS, metric])


def tradeoff_plot(table: pd.DataFrame, path: str | Path, metric: str) -> None:
    """Metric against weight size and against throughput, one labelled point per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, x, label in (
        (axes[0], "weights_mb", "encoder weights (MB)"),
        (axes[1], "encode_texts_per_s", "corpus encoding (texts/s)"),
    ):
        ax.scatter(table[x], table[metric])
        for _, row in table.iterrows():
            ax.annotate(f"{row['system']} ({row['precision']})", (row[x], row[metric]), fontsize="small")
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_entry(run: str, stage: str, base_model: str, model_dir: str | Path) -> dict:
    """One row of the training table from a trained model folder's ``training_state.json``
    (:data:`llmret.training.checkpointing.TRAINING_STATE`). Peak memory is the largest rank's: host RSS, and
    PyTorch's peak allocation on the accelerator (empty on CPU, and for models trained before
    the loop recorded memory)."""
    from llmret.training.checkpointing import TRAINING_STATE

    path = Path(model_dir) / TRAINING_STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        steps, train_s = int(state["steps"]), float(state["train_time_s"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{run}: {path} is missing (not a trained model folder?)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: not a training state ({type(err).__name__}: {err})") from None
    peak = state.get("peak_memory_mb") or {}
    loss = state.get("final_loss")
    return {
        "run": run,
        "stage": stage,
        "base_model": base_model,
        "steps": steps,
        "world_size": state.get("world_size"),
        "device": state.get("device"),
        "train_time_s": round(train_s, 1),
        "s_per_step": round(train_s / max(1, steps), 3),
        "peak_host_rss_mb": _rounded(peak.get("host_rss_mb")),
        "peak_device_mb": _rounded(peak.get("device_allocated_mb")),
        "final_loss": None if loss is None else round(float(loss), 4),
        "resumed_from_step": state.get("resumed_from_step"),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 1)


def training_table(rows: Sequence[Mapping]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=TRAINING_COLUMNS)
