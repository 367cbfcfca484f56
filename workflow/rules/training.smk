# Training stages (llmret.registry): one generic rule, and a named copy of it per stage that
# has logs and cluster resources of its own. Every run is resumable from its checkpoints and
# runs in one process per GPU (torchrun) when it has several; a LoRA stage saves the merged
# model and its adapter, a full-weight stage (LLaRA pretraining) the model alone.


rule train:
    """A run of a registered training stage (its config section, dataclass, entry point and
    data in llmret.registry); the stages below reuse it under their own names."""
    input:
        model=run_base_model,
        data=run_data,
        deepspeed=run_deepspeed,
    output:
        model=protected(directory("results/models/{run}")),
        adapter=directory("results/adapters/{run}"),
        train_log="results/train_logs/{run}.jsonl",
    log:
        "logs/train/{run}.log",
    benchmark:
        "results/benchmarks/train/{run}.tsv"
    wildcard_constraints:
        run=one_of(runs_of_rule("train")),
    conda:
        "../../envs/training.yaml"
    threads: 8
    resources:
        mem_mb=mem_mb("train"),
        gpu=run_gpus,
    params:
        spec=run_spec,
        tokenization=run_tokenization,
        lora=run_lora,
        training=run_training,
    script:
        "../scripts/train.py"


use rule train as llara_pretrain with:
    output:
        model=protected(directory("results/models/{run}")),
        train_log="results/train_logs/{run}.jsonl",
    log:
        "logs/llara_pretrain/{run}.log",
    benchmark:
        "results/benchmarks/llara_pretrain/{run}.tsv"
    wildcard_constraints:
        run=one_of(runs_of_rule("llara_pretrain")),


use rule train as finetune with:
    log:
        "logs/finetune/{run}.log",
    benchmark:
        "results/benchmarks/finetune/{run}.tsv"
    wildcard_constraints:
        run=one_of(runs_of_rule("finetune")),


use rule train as csplade_adapt with:
    log:
        "logs/csplade_adapt/{run}.log",
    benchmark:
        "results/benchmarks/csplade_adapt/{run}.tsv"
    wildcard_constraints:
        run=one_of(runs_of_rule("csplade_adapt")),


use rule train as csplade_train with:
    log:
        "logs/csplade_train/{run}.log",
    benchmark:
        "results/benchmarks/csplade_train/{run}.tsv"
    wildcard_constraints:
        run=one_of(runs_of_rule("csplade_train")),


rule plot_train_log:
    input:
        "results/train_logs/{run}.jsonl",
    output:
        report(
            "results/plots/{run}_loss.png",
            category="Training",
            caption="../report/train_loss.rst",
        ),
    log:
        "logs/plot_train_log/{run}.log",
    conda:
        "../../envs/evaluation.yaml"
    script:
        "../scripts/plot_train_log.py"
