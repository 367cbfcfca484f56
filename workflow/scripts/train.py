"""Snakemake entry point of every training stage (llmret.registry): DeepSpeed, resumable; one
process per GPU (torchrun) when the job has several."""

from pathlib import Path

from llmret import atomic_files, launch, logs, registry

sm = snakemake  # noqa: F821
logs.to_file(sm.log[0])
atomic_files.remove_stale_temporaries(sm.output)
run = sm.wildcards.run
stage = registry.stage_of(sm.config, run)
checkpoint_dir = f"results/checkpoints/{run}"
training = {**sm.params.training, "deepspeed_config": sm.input.deepspeed}
# Retention changes no model, so it is read from the config, not params (no rerun when it changes).
training["keep_checkpoints"] = sm.config[stage.section][run]["training"].get("keep_checkpoints")
training["log_path"] = str(Path(checkpoint_dir) / "train_log.jsonl")
kwargs = stage.call_arguments(
    data=sm.input.data,
    out_dir=sm.output.model,
    adapter_dir=sm.output.get("adapter"),
    model_dir=sm.input.model,
    spec=dict(sm.params.spec),
    lora=dict(sm.params.lora),
    training=training,
    checkpoint_dir=checkpoint_dir,
)
launch.run(stage.section, kwargs, nproc=int(sm.resources.gpu))
atomic_files.atomic_copy(training["log_path"], sm.output.train_log)
