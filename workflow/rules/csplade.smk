# CSPLADE training: the unsupervised adaptation phase on a corpus, then contrastive +
# FLOPS LoRA training on mined negatives. Both are LoRA stages with DeepSpeed, resumable,
# one process per GPU (torchrun) when the run has several; they save a merged causal LM
# (with its LM head) that sparse systems encode with.


rule csplade_adapt:
    input:
        model=model_of("adaptation", "run"),
        data=lambda wc: prepared(
            lookup(dpath=f"adaptation/{wc.run}/corpus", within=config), "corpus"
        ),
        deepspeed=lookup(
            dpath="adaptation/{run}/training/deepspeed_config", within=config
        ),
    output:
        model=protected(directory("results/models/{run}")),
        adapter=directory("results/adapters/{run}"),
        train_log="results/train_logs/{run}.jsonl",
    log:
        "logs/csplade_adapt/{run}.log",
    benchmark:
        "results/benchmarks/csplade_adapt/{run}.tsv"
    wildcard_constraints:
        run=one_of(ADAPTATION_RUNS),
    conda:
        "../../envs/training.yaml"
    threads: 8
    resources:
        mem_mb=mem_mb("train", section="adaptation"),
        gpu=lookup(dpath="adaptation/{run}/gpus", within=config),
    params:
        task="adapt",
        data_arg="corpus_path",
        spec=lambda wc: run_spec("adaptation", wc.run),
        tokenization=tokenization("adaptation", "run"),
        lora=lookup(dpath="adaptation/{run}/lora", within=config),
        training=lambda wc: training_settings("adaptation", wc.run),
        section="adaptation",
        checkpoint_dir=lambda wc: f"results/checkpoints/{wc.run}",
    script:
        "../scripts/train_lora.py"


rule csplade_train:
    input:
        model=model_of("csplade", "run"),
        data=negatives_of("csplade"),
        deepspeed=lookup(dpath="csplade/{run}/training/deepspeed_config", within=config),
    output:
        model=protected(directory("results/models/{run}")),
        adapter=directory("results/adapters/{run}"),
        train_log="results/train_logs/{run}.jsonl",
    log:
        "logs/csplade_train/{run}.log",
    benchmark:
        "results/benchmarks/csplade_train/{run}.tsv"
    wildcard_constraints:
        run=one_of(CSPLADE_RUNS),
    conda:
        "../../envs/training.yaml"
    threads: 8
    resources:
        mem_mb=mem_mb("train", section="csplade"),
        gpu=lookup(dpath="csplade/{run}/gpus", within=config),
    params:
        task="csplade",
        data_arg="negatives_path",
        spec=lambda wc: run_spec("csplade", wc.run),
        tokenization=tokenization("csplade", "run"),
        lora=lookup(dpath="csplade/{run}/lora", within=config),
        training=lambda wc: training_settings("csplade", wc.run),
        section="csplade",
        checkpoint_dir=lambda wc: f"results/checkpoints/{wc.run}",
    script:
        "../scripts/train_lora.py"
