# Stage 5: downscale the test period tile by tile; crop halos, stitch, de-normalise.


rule infer:
    input:
        checkpoint="results/model/checkpoint.pt",
        coarse="results/pairs/coarse.nc",
        fine="results/pairs/fine.nc",
    output:
        "results/downscaled/test.nc",
    log:
        "logs/infer.log",
    benchmark:
        "results/benchmarks/infer.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config("split", "infer"),
    shell:
        "python -m downscaler.cli infer --config {params.cfg:q} --checkpoint {input.checkpoint}"
        " --coarse {input.coarse} --fine {input.fine} --out {output} > {log} 2>&1"
