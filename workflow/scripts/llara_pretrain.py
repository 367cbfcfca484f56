"""Snakemake entry point: LLaRA pretraining with DeepSpeed, resumable from checkpoints;
one process per GPU (torchrun) when the job has several."""

from pathlib import Path

from llmret import atomic_files, launch, logs

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
training = {**sm.params.training, "deepspeed_config": sm.input.deepspeed}
# Retention changes no model, so it is read from the config, not params (no rerun when it changes).
training["keep_checkpoints"] = sm.config[sm.params.section][sm.wildcards.run]["training"].get("keep_checkpoints")
training["log_path"] = str(Path(sm.params.checkpoint_dir) / "train_log.jsonl")
launch.run(
    "pretrain",
    {
        "model_dir": sm.input.model,
        "manifest": sm.input.manifest,
        "spec": dict(sm.params.spec),
        "training": training,
        "out_dir": sm.output.model,
        "checkpoint_dir": sm.params.checkpoint_dir,
    },
    nproc=int(sm.resources.gpu),
)
atomic_files.atomic_copy(training["log_path"], sm.output.train_log)
