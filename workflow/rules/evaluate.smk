# Stage 6: scores of the model and the baselines on the test period, figures (PNG + PDF), the
# TILES seam check and the scaling plot; every figure and table goes into
# `snakemake --report results/report.html` with a caption from workflow/report/.
rule fit_baselines:
    input:
        fine="results/pairs/fine.nc",
        coarse="results/pairs/coarse.nc",
        stats="results/pairs/stats.json",
    output:
        "results/evaluation/baselines_fitted.nc",
    log:
        "logs/fit_baselines.log",
    benchmark:
        "results/benchmarks/fit_baselines.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        # only what the fit reads, so other evaluate keys do not re-run it
        cfg=json.dumps(
            {
                "split": config["split"],
                "evaluate": {"time_chunk": config["evaluate"]["time_chunk"]},
            },
            sort_keys=True,
        ),
    shell:
        "python -m downscaler.cli fit_baselines --config {params.cfg:q} --fine {input.fine}"
        " --coarse {input.coarse} --stats {input.stats} --out {output} > {log} 2>&1"


rule evaluate:
    input:
        unpack(optional_baselines),
        downscaled=downscaled("test"),
        fine="results/pairs/fine.nc",
        coarse="results/pairs/coarse.nc",
        stats="results/pairs/stats.json",
        loss_log="results/model/training_log.csv",
    output:
        verdict=report(
            "results/evaluation/verdict.rst",
            caption="../report/verdict.rst",
            category="Scores",
            labels={"table": "verdict"},
        ),
        metrics=report(
            "results/evaluation/metrics.csv",
            caption="../report/metrics.rst",
            category="Scores",
            labels={"table": "metrics (tidy)"},
        ),
        table=report(
            "results/evaluation/table.md",
            caption="../report/table.rst",
            category="Scores",
            labels={"table": "paper-style table"},
        ),
        training=report(
            f"{FIGURE_DIR}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Figures",
            subcategory="training",
            labels={"figure": "training curves", "variable": "all"},
        ),
        skill=report(
            f"{FIGURE_DIR}/skill.png",
            caption="../report/skill.rst",
            category="Scores",
            labels={"figure": "skill against the baselines"},
        ),
        figures=[figure_report(f) for f in SCORE_FIGURES],
        ensemble=ensemble_figures(),
        pdfs=[
            pdf(f)
            for f in [
                f"{FIGURE_DIR}/training_curves.png",
                f"{FIGURE_DIR}/skill.png",
                *SCORE_FIGURES,
                *ENSEMBLE_FIGURES,
            ]
        ],
    log:
        "logs/evaluate.log",
    benchmark:
        "results/benchmarks/evaluate.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config("split", "evaluate"),
        upsample_vit=lambda wildcards, input: input.get("upsample_vit", "none"),
        fitted=lambda wildcards, input: input.get("fitted", "none"),
        figures_dir=lambda wildcards, output: os.path.dirname(output.training),
    shell:
        "python -m downscaler.cli evaluate --config {params.cfg:q} --downscaled {input.downscaled}"
        " --upsample-vit {params.upsample_vit} --fitted {params.fitted} --fine {input.fine}"
        " --coarse {input.coarse} --stats {input.stats} --loss-log {input.loss_log}"
        " --metrics {output.metrics} --table {output.table} --verdict {output.verdict}"
        " --figures {params.figures_dir} > {log} 2>&1"


rule tiles_seam_check:
    input:
        checkpoint="results/model/checkpoint.pt",
        coarse="results/pairs/coarse.nc",
        fine="results/pairs/fine.nc",
    output:
        csv=report(
            "results/evaluation/tiles_seams.csv",
            caption="../report/tiles_seams.rst",
            category="TILES",
            labels={"table": "seam check"},
        ),
        figure=report(
            f"{FIGURE_DIR}/tiles_seams.png",
            caption="../report/tiles_seams.rst",
            category="TILES",
            labels={"figure": "seam check"},
        ),
        pdf=pdf(f"{FIGURE_DIR}/tiles_seams.png"),
    log:
        "logs/tiles_seam_check.log",
    benchmark:
        "results/benchmarks/tiles_seam_check.tsv"
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config("split", "infer", "evaluate"),
    shell:
        "python -m downscaler.cli seams --config {params.cfg:q} --checkpoint {input.checkpoint}"
        " --coarse {input.coarse} --fine {input.fine} --csv {output.csv}"
        " --figure {output.figure} > {log} 2>&1"


rule scaling_figure:
    input:
        scaling_inputs,
    output:
        csv=report(
            "results/evaluation/scaling.csv",
            caption="../report/scaling.rst",
            category="Scaling",
            labels={"table": "benchmark records"},
        ),
        figure=report(
            f"{FIGURE_DIR}/scaling.png",
            caption="../report/scaling.rst",
            category="Scaling",
            labels={"figure": "scaling"},
        ),
        pdf=pdf(f"{FIGURE_DIR}/scaling.png"),
    log:
        "logs/scaling_figure.log",
    conda:
        "../../envs/cpu.yaml"
    params:
        cfg=stage_config("evaluate"),
        # the folder read (not only the demo benchmarks' inputs: any JSON found there)
        results_dir=lambda wildcards: config["evaluate"]["benchmarks"],
    shell:
        "python -m downscaler.cli scaling --config {params.cfg:q}"
        " --results-dir {params.results_dir:q} --csv {output.csv} --figure {output.figure}"
        " > {log} 2>&1"
