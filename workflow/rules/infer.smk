# Stage 5: downscale tile by tile (halos as trained), crop/blend, stitch, de-normalise, and
# append each chunk of time steps to the output as it is computed.
#   results/downscaled/test.nc    the test split of results/pairs/coarse.nc (rule infer_test)
#   results/downscaled/NAME.nc    any results/inputs/NAME.nc on the model's coarse grid
#                                 (rule infer_input)
# With infer.format: zarr the suffix is .zarr (a directory): use downscaled(NAME) for paths.


ruleorder: infer_test > infer_input


rule infer_test:
    input:
        checkpoint="results/model/checkpoint.pt",
        members=config["infer"]["ensemble"]["checkpoints"],
        coarse="results/pairs/coarse.nc",
        fine="results/pairs/fine.nc",
    output:
        downscaled_output("test"),
    log:
        "logs/infer/test.log",
    benchmark:
        "results/benchmarks/infer_test.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: config["infer"]["processes"]
    params:
        cfg=stage_config("split", "infer"),
    shell:
        "python -m downscaler.cli infer --config {params.cfg:q} --checkpoint {input.checkpoint}"
        " --architecture reslim --coarse {input.coarse} --fine {input.fine} --split test"
        " --out {output} > {log} 2>&1"


rule infer_input:
    input:
        checkpoint="results/model/checkpoint.pt",
        members=config["infer"]["ensemble"]["checkpoints"],
        coarse="results/inputs/{name}.nc",
        fine="results/pairs/fine.nc",
    output:
        downscaled_output("{name}"),
    log:
        "logs/infer/{name}.log",
    benchmark:
        "results/benchmarks/infer_{name}.tsv"
    wildcard_constraints:
        name="[^/]+",
    conda:
        "../../envs/cpu.yaml"
    threads: config["infer"]["processes"]
    params:
        cfg=stage_config("split", "infer"),
    shell:
        "python -m downscaler.cli infer --config {params.cfg:q} --checkpoint {input.checkpoint}"
        " --architecture reslim --coarse {input.coarse} --fine {input.fine} --split all"
        " --out {output} > {log} 2>&1"


rule infer_upsample_vit:
    input:
        checkpoint=upsample_vit_checkpoint(),
        coarse="results/pairs/coarse.nc",
        fine="results/pairs/fine.nc",
    output:
        "results/downscaled/baselines/upsample_vit_test.nc",
    log:
        "logs/infer/upsample_vit_test.log",
    benchmark:
        "results/benchmarks/infer_upsample_vit_test.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: config["infer"]["processes"]
    params:
        cfg=lambda wildcards: json.dumps(
            {
                "split": config["split"],
                "infer": {**config["infer"], "format": "netcdf"},
            },
            sort_keys=True,
        ),
    shell:
        "python -m downscaler.cli infer --config {params.cfg:q} --checkpoint {input.checkpoint}"
        " --architecture upsample_vit --coarse {input.coarse} --fine {input.fine} --split test"
        " --out {output} > {log} 2>&1"
