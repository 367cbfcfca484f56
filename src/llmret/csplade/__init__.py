"""CSPLADE: the adaptation phase and contrastive + FLOPS sparse training (docs/csplade.md)."""
