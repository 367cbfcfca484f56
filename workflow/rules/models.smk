# Base models: any source (hub id, local folder, package folder, packaged GGUF) becomes a
# plain HF checkpoint in safetensors under resources/models/{model}.


rule import_model:
    output:
        directory("resources/models/{model}"),
    log:
        "logs/models/{model}.log",
    benchmark:
        "results/benchmarks/models/{model}.tsv"
    conda:
        "../../envs/retrieval.yaml"
    resources:
        mem_mb=4000,
    params:
        source=lambda wc: config["models"][wc.model],
    script:
        "../scripts/import_model.py"
