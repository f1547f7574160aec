# Stage 4: train Reslim on the train tiles, validating on the val tiles (downscaler.train).
# Locally the rule spawns parallel.processes ranks itself; under the frontier profile the
# `mpi` resource is the srun line (one task per GPU) and every task is one rank. A run stopped
# by SIGTERM/SIGUSR1 saves results/model/train_state/ and exits 75; running the rule again
# (Snakemake `retries`, or a resubmission) resumes from it. Stopping Snakemake itself (Ctrl-C,
# SIGTERM) does the same for a local training: Snakemake would wait for it to finish, so the
# onstart hook passes the stop on (downscaler.workflow_signals).
from downscaler.workflow_signals import forward_stop_to_training


onstart:
    forward_stop_to_training()


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
    threads: config["parallel"]["processes"]
    resources:
        mpi="",
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
            "parallel",
        ),
    shell:
        "{resources.mpi} python -m downscaler.cli train --config {params.cfg:q}"
        " --train {input.train} --val {input.val}"
        " --checkpoint {output.checkpoint} --log {output.log} > {log} 2>&1"


# The upsample-first ViT baseline (evaluate.baselines: [..., upsample_vit]): the same training
# entry point, rule and training rule (budget, schedule, early stopping, best checkpoint) as
# Reslim, on the same tiles, with model.architecture set to upsample_vit.
rule train_upsample_vit:
    input:
        train="results/tiles/train.zarr",
        val="results/tiles/val.zarr",
    output:
        checkpoint="results/model/baselines/upsample_vit/checkpoint.pt",
        log="results/model/baselines/upsample_vit/training_log.csv",
    log:
        "logs/train_upsample_vit.log",
    benchmark:
        "results/benchmarks/train_upsample_vit.tsv"
    conda:
        "../../envs/cpu.yaml"
    threads: config["parallel"]["processes"]
    resources:
        mpi="",
    params:
        cfg=lambda wildcards: json.dumps(
            {
                **{
                    k: config[k]
                    for k in (
                        "seed",
                        "variables",
                        "statics",
                        "split",
                        "regrid",
                        "tiles",
                        "train",
                        "parallel",
                    )
                },
                "model": {**config["model"], "architecture": "upsample_vit"},
            },
            sort_keys=True,
        ),
    shell:
        "{resources.mpi} python -m downscaler.cli train --config {params.cfg:q}"
        " --train {input.train} --val {input.val}"
        " --checkpoint {output.checkpoint} --log {output.log} > {log} 2>&1"
