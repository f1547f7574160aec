# Reslim + TILES climate downscaling, end to end. Stages live in workflow/rules/*.smk, their
# logic in workflow/lib/downscaler. Run: `snakemake --cores all` (demo) or
# `snakemake --profile frontier` on OLCF Frontier.
from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/outputs.smk"
include: "workflow/rules/source.smk"
include: "workflow/rules/pairs.smk"
include: "workflow/rules/tiles.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/bench_common.smk"
include: "workflow/rules/benchmarks.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/paper.smk"


# Downloads need the internet and small steps are not worth a batch job: on a cluster these run
# where Snakemake runs (the login node), not through the scheduler.
localrules:
    all,
    source,
    prepare_input,
    scaling_figure,
    paper,
    bench,


rule all:
    default_target: True
    input:
        "results/model/checkpoint.pt",
        downscaled("test"),
        "results/evaluation/metrics.csv",
        "results/evaluation/table.md",
        FIGURES,
        [downscaled(name) for name in config["inference_inputs"]],
