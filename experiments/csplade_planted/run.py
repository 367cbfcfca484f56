"""A planted-passage probe of CSPLADE's two training stages: do the sparse vectors keep a
query's own rare (made-up) words and rank the one passage that shares them first?

Synthetic data, no download: 60 training and 30 held-out made-up words ("zorquenblax"), each
with a query ("what is the zorquenblax") and a passage ("The zorquenblax is an enzyme that cuts
DNA, first described in a study of mice."); a training group's negative is another word's
passage on the same topic, so only the made-up word separates them. The probe itself is
:func:`llmret.csplade.planted.run_planted` (the library's ``AdaptationModel`` and
``SparseModel`` trained by the probes' plain AdamW loop, :func:`llmret.training.plain_loop.plain_steps`:
gradient norm clipped at 1.0 and a 5-step linear warm-up as the training stages do, no
DeepSpeed); every ``eval`` line gives, on the 30 held-out queries against their 30 passages,
the share ranked first (``top1``, chance 0.033), the share of each query's made-up word's
tokens with a non-zero weight in its own vector (``own_kept``), the share of queries that keep
at least one of them (``own_any``) and terms per vector.

    python experiments/csplade_planted/run.py --model .cache/test-models/smollm2-135m \\
        --adapt-steps 30 --scale-weight 0.3 --train-steps 40 --queries 4
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path

import torch

from llmret.csplade.planted import PlantedRecipe, run_planted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="causal LM checkpoint (HF, safetensors)")
    for f in fields(PlantedRecipe):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            ap.add_argument(flag, action="store_true")
        else:
            ap.add_argument(flag, type=float if f.type == "float" else int, default=f.default)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = PlantedRecipe(**{f.name: getattr(args, f.name) for f in fields(PlantedRecipe)})
    run_planted(args.model, recipe, lambda record: print(json.dumps(record), flush=True))


if __name__ == "__main__":
    main()
