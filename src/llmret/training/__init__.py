"""The generic DeepSpeed training loop and what its stages share: LoRA, contrastive loss, mining."""
