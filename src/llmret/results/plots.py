"""Training-loss plots: each loss of a JSONL training log against the step, for the report.

Log format: docs/training.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def plot_training_log(log_path: str | Path, out_png: str | Path, title: str = "") -> None:
    """Loss per task against step, from the JSONL training log."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()]
    # A resumed run logs the steps after its checkpoint again: the later line wins.
    rows = sorted({r["step"]: r for r in rows if "step" in r and "loss" in r}.values(), key=lambda r: r["step"])
    if not rows:
        raise ValueError(f"{log_path}: no training steps logged")
    keys = ["loss"] + sorted(k for k in rows[0] if k.startswith("loss_"))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for k in keys:
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
