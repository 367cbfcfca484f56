"""CSPLADE's two training stages must make SmolLM2 retrieve: a fixed planted-word run
(``llmret.csplade.planted``, also ``experiments/csplade_planted``; 30 adaptation + 40
contrastive steps, about 3 minutes on 2 CPU cores) whose vectors must turn sparse, keep each
query's made-up word and rank the one passage that shares it first. It fails when pooling,
masks, the adaptation or the contrastive loss break, which the stages' own unit tests (loss
targets, shapes) would not notice."""

from __future__ import annotations

import pytest
import torch

from llmret.csplade.planted import PlantedRecipe, run_planted

# A research probe: about 3 minutes of training SmolLM2 on 2 CPU cores.
pytestmark = pytest.mark.slow


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# Measured with this recipe (seed 0 and 1; chance top1 1/30 = 0.033):
#   zero-shot: top1 0.033, every one of the 49,152 terms active in every vector;
#   adapted (30 steps, next-token + logit-scale 0.3): 465-990 terms per query, top1 0.07-0.53;
#   trained (40 contrastive steps): top1 0.90 / 0.77, 16-63 terms per query, a query keeps at
#   least one of its made-up word's tokens in 0.87-0.93 of queries.
def test_planted_passages_rank_first_after_adaptation_and_training(smollm2_dir, two_threads):
    figures = run_planted(smollm2_dir, PlantedRecipe(seed=0))
    zero, adapted, trained = figures["zero-shot"], figures["adapted"], figures["trained"]
    assert zero["top1"] <= 0.1 and zero["nnz_q"] > 40_000, zero  # the base LM: dense, no ranking
    assert adapted["nnz_q"] < 5_000 and adapted["nnz_d"] < 5_000, adapted  # adaptation sparsifies
    assert trained["top1"] >= 0.6, trained  # the planted passage first for most queries
    assert trained["own_any"] >= 0.8 and trained["nnz_q"] < 500, trained  # own rare tokens kept, sparse
