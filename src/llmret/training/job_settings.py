"""What a training run's settings resolve to from its GPU count, decided before any job starts
and without torch (the workflow calls these while it reads the config): the DeepSpeed file
``deepspeed_config: auto`` stands for, and the global batch a run says it intends.

Design notes: docs/training.md.
"""

from __future__ import annotations

AUTO = "auto"
CPU_DEEPSPEED_CONFIG = "config/deepspeed/cpu.json"  # ZeRO-0, float32, torch AdamW
GPU_DEEPSPEED_CONFIG = "config/deepspeed/gpu_zero2_bf16.json"  # ZeRO-2, bf16


def deepspeed_config_for(setting: str | None, gpus: int) -> str:
    """The DeepSpeed JSON of a run: ``setting`` itself when it names a file (None: the schema's
    default, :data:`CPU_DEEPSPEED_CONFIG`); for ``auto`` ZeRO-2 in bf16
    (:data:`GPU_DEEPSPEED_CONFIG`) when the run has GPUs (``gpus`` > 0, resolved) and ZeRO-0 in
    float32 (:data:`CPU_DEEPSPEED_CONFIG`) when it trains on the CPU. The one place this choice
    is made (the workflow, ``TrainingArgs`` and the memory sizing follow it)."""
    if setting is None:
        return CPU_DEEPSPEED_CONFIG
    if setting != AUTO:
        return setting
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ValueError(f"deepspeed_config auto needs a resolved GPU count (an integer >= 0), got {gpus!r}")
    return GPU_DEEPSPEED_CONFIG if gpus > 0 else CPU_DEEPSPEED_CONFIG


def check_global_batch(
    intended: int | None, per_device: int, accumulation: int, ranks: int, where: str = "training"
) -> None:
    """Refuse a run whose global batch (``per_device_batch_size x ranks x
    gradient_accumulation_steps``) is not the ``global_batch_size`` it intends (None: no check),
    naming the setting and the three factors: a preset tuned for 8 GPUs would otherwise train
    with half its batch on 4."""
    if intended is None:
        return
    ranks = max(1, ranks)
    actual = per_device * ranks * accumulation
    if actual != intended:
        raise ValueError(
            f"{where}.global_batch_size is {intended} but the run's global batch is {actual}: "
            f"per_device_batch_size {per_device} x {ranks} GPUs (ranks) x gradient_accumulation_steps "
            f"{accumulation}; change one of the three (or global_batch_size, or null it to skip the check)"
        )
