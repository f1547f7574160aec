# Benchmarks as rules: each runs benchmarks/bench_<name>.py at a size from config["benchmarks"]
# ("demo": seconds, for the demo's scaling figure; "paper": a laptop, for `make paper`) and writes
# results/benchmarks/<size>/<name>.json (machine, device, measured matmul peak, date, versions)
# next to Snakemake's own benchmark TSV. `threads: BENCH_THREADS` keeps them from sharing the
# machine with other rules, which would distort the timings.
wildcard_constraints:
    size="demo|paper",
    variant="[a-z-]+",


rule bench_mfu:
    output:
        f"{BENCH_DIR}/{{size}}/mfu.json",
    log:
        "logs/benchmarks/{size}/mfu.log",
    benchmark:
        f"{BENCH_DIR}/{{size}}/mfu.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: BENCH_THREADS
    params:
        options=lambda wildcards: bench_options(wildcards.size, "mfu"),
    shell:
        bench_shell("mfu")


rule bench_reslim_vs_baseline:
    output:
        f"{BENCH_DIR}/{{size}}/reslim_vs_baseline.json",
    log:
        "logs/benchmarks/{size}/reslim_vs_baseline.log",
    benchmark:
        f"{BENCH_DIR}/{{size}}/reslim_vs_baseline.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: BENCH_THREADS
    params:
        options=lambda wildcards: bench_options(wildcards.size, "reslim_vs_baseline"),
    shell:
        bench_shell("reslim_vs_baseline")


rule bench_tiles_scaling:
    output:
        f"{BENCH_DIR}/{{size}}/tiles_scaling.json",
    log:
        "logs/benchmarks/{size}/tiles_scaling.log",
    benchmark:
        f"{BENCH_DIR}/{{size}}/tiles_scaling.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: BENCH_THREADS
    params:
        options=lambda wildcards: bench_options(wildcards.size, "tiles_scaling"),
    shell:
        bench_shell("tiles_scaling")


rule bench_dchag_memory:
    output:
        f"{BENCH_DIR}/{{size}}/dchag_memory_{{variant}}.json",
    log:
        "logs/benchmarks/{size}/dchag_memory_{variant}.log",
    benchmark:
        f"{BENCH_DIR}/{{size}}/dchag_memory_{{variant}}.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: BENCH_THREADS
    params:
        options=lambda wildcards: bench_options(wildcards.size, "dchag_memory")
        + f" --variant {wildcards.variant}",
    shell:
        bench_shell("dchag_memory")


rule bench_train_scaling:
    output:
        f"{BENCH_DIR}/{{size}}/train_scaling.json",
    log:
        "logs/benchmarks/{size}/train_scaling.log",
    benchmark:
        f"{BENCH_DIR}/{{size}}/train_scaling.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: BENCH_THREADS
    params:
        options=lambda wildcards: bench_options(wildcards.size, "train_scaling"),
    shell:
        bench_shell("train_scaling")


rule bench_inference:
    output:
        f"{BENCH_DIR}/{{size}}/inference.json",
    log:
        "logs/benchmarks/{size}/inference.log",
    benchmark:
        f"{BENCH_DIR}/{{size}}/inference.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: BENCH_THREADS
    params:
        options=lambda wildcards: bench_options(wildcards.size, "inference"),
    shell:
        bench_shell("inference")


# Conservative regridding (the exact k-fold block mean, xarray-regrid, xESMF where it imports)
# against the machine's memory-copy bandwidth, on a year of hourly Europe-size fields.
rule bench_regrid:
    output:
        f"{BENCH_DIR}/{{size}}/regrid.json",
    log:
        "logs/benchmarks/{size}/regrid.log",
    benchmark:
        f"{BENCH_DIR}/{{size}}/regrid.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: BENCH_THREADS
    params:
        options=lambda wildcards: bench_options(wildcards.size, "regrid"),
    shell:
        bench_shell("regrid")


# Streaming evaluation: peak memory of the evaluate stage's code at 1x and 10x the test length.
rule bench_evaluate:
    output:
        f"{BENCH_DIR}/{{size}}/evaluate.json",
    log:
        "logs/benchmarks/{size}/evaluate.log",
    benchmark:
        f"{BENCH_DIR}/{{size}}/evaluate.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: BENCH_THREADS
    params:
        options=lambda wildcards: bench_options(wildcards.size, "evaluate"),
    shell:
        bench_shell("evaluate")


# The pipeline bubble vs (stages, micro-batches) against (p-1)/(m+p-1): GPipe and 1F1B.
rule bench_pipeline:
    output:
        f"{BENCH_DIR}/{{size}}/pipeline.json",
    log:
        "logs/benchmarks/{size}/pipeline.log",
    benchmark:
        f"{BENCH_DIR}/{{size}}/pipeline.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: BENCH_THREADS
    params:
        options=lambda wildcards: bench_options(wildcards.size, "pipeline"),
    shell:
        bench_shell("pipeline")


# Sequence-length scaling: step time and peak memory per rank vs tokens (sp 1, Ulysses, LSS).
rule bench_sequence:
    output:
        f"{BENCH_DIR}/{{size}}/sequence.json",
    log:
        "logs/benchmarks/{size}/sequence.log",
    benchmark:
        f"{BENCH_DIR}/{{size}}/sequence.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: BENCH_THREADS
    params:
        options=lambda wildcards: bench_options(wildcards.size, "sequence"),
    shell:
        bench_shell("sequence")


rule bench:
    input:
        bench_results("paper"),
