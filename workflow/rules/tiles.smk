# Stage 3: TILES patches with halos, one zarr store per training split.


rule tiles:
    input:
        fine="results/pairs/fine.nc",
        coarse="results/pairs/coarse.nc",
        stats="results/pairs/stats.json",
    output:
        directory("results/tiles/{split}.zarr"),
    log:
        "logs/tiles_{split}.log",
    benchmark:
        "results/benchmarks/tiles_{split}.tsv"
    wildcard_constraints:
        split="train|val",
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config("inputs", "targets", "statics", "frequency", "split", "tiles"),
    shell:
        "python -m downscaler.cli tiles --config {params.cfg:q} --fine {input.fine} --coarse {input.coarse}"
        " --stats {input.stats} --split {wildcards.split} --out {output} > {log} 2>&1"
