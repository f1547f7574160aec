# Stage 1: high-resolution fields and statics in canonical form (results/raw/), from the
# configured source: synthetic demo data, ERA5 from the Climate Data Store, or local files.
# ERA5 answers land in era5.raw_dir first (one file per request), so a re-run resumes.

SOURCE_KEYS = [
    "seed",
    "source",
    "variables",
    "region",
    "period",
    "frequency",
    "resolution",
]
SOURCE_KEYS += {"era5": ["era5"], "local": ["local"]}.get(config["source"], [])


rule source:
    output:
        fields="results/raw/fields.nc",
        static="results/raw/static.nc",
    log:
        "logs/source.log",
    benchmark:
        "results/benchmarks/source.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config(*SOURCE_KEYS),
        raw_dir=config["era5"]["raw_dir"],
    shell:
        "python -m downscaler.cli source --config {params.cfg:q} --raw-dir {params.raw_dir}"
        " --fields {output.fields} --static {output.static} > {log} 2>&1"


# Other data to downscale (CMIP6 runs, local files), on the model's coarse grid.
rule prepare_input:
    input:
        coarse="results/pairs/coarse.nc",
    output:
        "results/inputs/{name}.nc",
    log:
        "logs/prepare_input_{name}.log",
    benchmark:
        "results/benchmarks/prepare_input_{name}.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=lambda wildcards: input_config(wildcards.name),
        raw_dir=config["era5"]["raw_dir"],
    shell:
        "python -m downscaler.cli prepare_input --config {params.cfg:q} --name {wildcards.name}"
        " --raw-dir {params.raw_dir} --coarse {input.coarse} --out {output} > {log} 2>&1"
