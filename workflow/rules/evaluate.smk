# Stage 6: scores of the model and interpolation baselines on the test period; figures.


rule evaluate:
    input:
        downscaled="results/downscaled/test.nc",
        fine="results/pairs/fine.nc",
        coarse="results/pairs/coarse.nc",
        loss_log="results/model/training_log.csv",
    output:
        metrics="results/evaluation/metrics.csv",
        table="results/evaluation/table.md",
        figures=FIGURES,
    log:
        "logs/evaluate.log",
    benchmark:
        "results/benchmarks/evaluate.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config("split", "evaluate"),
        figures_dir=lambda wildcards, output: os.path.dirname(output.figures[0]),
    shell:
        "python -m downscaler.cli evaluate --config {params.cfg:q} --downscaled {input.downscaled}"
        " --fine {input.fine} --coarse {input.coarse} --loss-log {input.loss_log}"
        " --metrics {output.metrics} --table {output.table} --figures {params.figures_dir}"
        " > {log} 2>&1"
