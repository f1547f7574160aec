# Stage 1: canonical data in results/raw/: the targets and the requested statics on the fine
# grid (rule source), and the inputs on their own grid unless they are the coarsened targets
# (rule source_inputs). ERA5 answers land in era5.raw_dir first (one file per request), so a
# re-run resumes.

SOURCE_KEYS = [
    "seed",
    "targets",
    "statics",
    "static_paths",
    "region",
    "period",
    "frequency",
    "coverage",
]
SOURCE_KEYS += ["era5"] if config["targets"]["source"] == "era5" else []


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


INPUT_KEYS = ["seed", "inputs", "targets", "region", "period", "frequency", "coverage"]
INPUT_KEYS += ["era5"] if config["inputs"]["source"] == "era5" else []


rule source_inputs:
    output:
        "results/raw/inputs.nc",
    log:
        "logs/source_inputs.log",
    benchmark:
        "results/benchmarks/source_inputs.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config(*INPUT_KEYS),
        raw_dir=config["era5"]["raw_dir"],
    shell:
        "python -m downscaler.cli source_inputs --config {params.cfg:q}"
        " --raw-dir {params.raw_dir} --out {output} > {log} 2>&1"


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
