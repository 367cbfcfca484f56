"""LLaRA pretraining: the objective, its model, the pairs, token shards and the stages (docs/llara.md)."""
