"""RepLLaMA-style LoRA contrastive fine-tuning of a base LLM or a LLaRA run (docs/finetuning.md)."""
