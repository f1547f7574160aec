# Stage 2: conservative coarsening into (coarse input, fine target) pairs; train-only statistics.


rule pairs:
    input:
        fields="results/raw/fields.nc",
        static="results/raw/static.nc",
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
        cfg=stage_config("variables", "statics", "regrid", "split"),
    shell:
        "python -m downscaler.cli pairs --config {params.cfg:q} --fields {input.fields} --static {input.static}"
        " --fine {output.fine} --coarse {output.coarse} --stats {output.stats} > {log} 2>&1"
