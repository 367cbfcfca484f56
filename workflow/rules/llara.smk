# LLaRA pretraining: (text, next text) pairs from the corpora's documents (no labels),
# tokenized into a fixed number of shards (one job each), then EBAE/EBAR training with
# DeepSpeed. Checkpoints live in results/checkpoints/{run} (undeclared), so a killed job
# rerun resumes; only the final HF checkpoint is the declared (protected) output.


rule llara_shard:
    input:
        model=lambda wc: model_dir(config["pretraining"][wc.run]["model"]),
        corpora=lambda wc: [
            prepared(d, "corpus") for d in config["pretraining"][wc.run]["corpora"]
        ],
    output:
        "results/shards/{run}/shard-{shard}.safetensors",
    log:
        "logs/llara_shard/{run}/{shard}.log",
    benchmark:
        "results/benchmarks/llara_shard/{run}/{shard}.tsv"
    wildcard_constraints:
        run=one_of(PRETRAIN_RUNS),
        shard=r"\d+",
    conda:
        "../../envs/training.yaml"
    params:
        spec=lambda wc: pretrain_spec(wc.run),
    script:
        "../scripts/llara_shard.py"


rule llara_manifest:
    input:
        lambda wc: expand(
            "results/shards/{run}/shard-{shard}.safetensors",
            run=wc.run,
            shard=range(pretrain_spec(wc.run)["shards"]),
        ),
    output:
        "results/shards/{run}/manifest.json",
    log:
        "logs/llara_manifest/{run}.log",
    wildcard_constraints:
        run=one_of(PRETRAIN_RUNS),
    conda:
        "../../envs/training.yaml"
    script:
        "../scripts/llara_manifest.py"


rule llara_pretrain:
    input:
        model=lambda wc: model_dir(config["pretraining"][wc.run]["model"]),
        manifest="results/shards/{run}/manifest.json",
        deepspeed=lambda wc: config["pretraining"][wc.run]["training"][
            "deepspeed_config"
        ],
    output:
        model=protected(directory("results/models/{run}")),
        train_log="results/train_logs/{run}.jsonl",
    log:
        "logs/llara_pretrain/{run}.log",
    benchmark:
        "results/benchmarks/llara_pretrain/{run}.tsv"
    wildcard_constraints:
        run=one_of(PRETRAIN_RUNS),
    conda:
        "../../envs/training.yaml"
    threads: 8
    resources:
        mem_mb=16000,
        gpu=lambda wc: config["pretraining"][wc.run]["gpus"],
    params:
        spec=lambda wc: pretrain_spec(wc.run),
        training=lambda wc: config["pretraining"][wc.run]["training"],
        checkpoint_dir=lambda wc: f"results/checkpoints/{wc.run}",
    script:
        "../scripts/llara_pretrain.py"


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
