# Stage 4: train Reslim on the train tiles, validating on the val tiles every epoch.


rule train:
    input:
        train="results/tiles/train.zarr",
        val="results/tiles/val.zarr",
    output:
        checkpoint="results/model/checkpoint.pt",
        log="results/model/training_log.csv",
    log:
        "logs/train.log",
    benchmark:
        "results/benchmarks/train.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config(
            "seed",
            "variables",
            "statics",
            "split",
            "regrid",
            "tiles",
            "model",
            "train",
        ),
    shell:
        "python -m downscaler.cli train --config {params.cfg:q} --train {input.train} --val {input.val}"
        " --checkpoint {output.checkpoint} --log {output.log} > {log} 2>&1"
