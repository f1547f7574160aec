# Stage 2: (coarse input, fine target) pairs: the inputs conservatively onto the coarse grid
# (k x k blocks of the target grid), the targets and statics on the fine grid, train-only
# statistics and the lists of inputs / targets / statics (results/pairs/stats.json).


rule pairs:
    input:
        unpack(pairs_inputs),
    output:
        fine="results/pairs/fine.nc",
        coarse="results/pairs/coarse.nc",
        stats="results/pairs/stats.json",
    log:
        "logs/pairs.log",
    benchmark:
        "results/benchmarks/pairs.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config("inputs", "targets", "statics", "frequency", "regrid", "split"),
        inputs=lambda wildcards, input: input.get("inputs", "none"),
    shell:
        "python -m downscaler.cli pairs --config {params.cfg:q} --fields {input.fields}"
        " --inputs {params.inputs} --static {input.static} --fine {output.fine}"
        " --coarse {output.coarse} --stats {output.stats} > {log} 2>&1"
