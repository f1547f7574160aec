# Stage 1: high-resolution fields and statics in canonical form (results/raw/).


rule synthetic:
    output:
        fields="results/raw/fields.nc",
        static="results/raw/static.nc",
    log:
        "logs/synthetic.log",
    benchmark:
        "results/benchmarks/synthetic.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config(
            "seed", "variables", "region", "period", "frequency", "resolution"
        ),
    shell:
        "python -m downscaler.cli synthetic --config {params.cfg:q} --fields {output.fields}"
        " --static {output.static} > {log} 2>&1"
