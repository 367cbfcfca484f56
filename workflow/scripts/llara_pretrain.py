"""Snakemake entry point: LLaRA pretraining with DeepSpeed, resumable from checkpoints."""

from pathlib import Path

from llmret import logs, pretraining

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
training = {k: v for k, v in sm.params.training.items()}
training["log_path"] = str(Path(sm.params.checkpoint_dir) / "train_log.jsonl")
pretraining.pretrain(
    model_dir=sm.input.model,
    manifest=sm.input.manifest,
    spec=pretraining.PretrainSpec.from_config(sm.params.spec),
    training=training,
    out_dir=sm.output.model,
    checkpoint_dir=sm.params.checkpoint_dir,
)
pretraining.copy_log(training["log_path"], sm.output.train_log)
