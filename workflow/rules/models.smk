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
        mem_mb=mem_mb("import"),
    params:
        source=model_source,
    script:
        "../scripts/import_model.py"
