# The papers' figures and tables (`snakemake --cores all paper`, `make paper`): each figure is
# drawn by benchmarks/paper_figures.py from the paper-size benchmark rules' JSON and lands in
# results/paper/ as PNG + PDF + the JSON behind it; the skill table and the maps / spectra come
# from the evaluation. All of them are indexed in the report under "Paper".
PAPER_DIR = "results/paper"
PAPER_B = f"{BENCH_DIR}/paper"
PAPER_INPUTS = {
    "reslim_vs_vit": [f"{PAPER_B}/reslim_vs_baseline.json"],
    "tiles": [f"{PAPER_B}/tiles_scaling.json"],
    "dchag_memory": [
        f"{PAPER_B}/dchag_memory_{v}.json"
        for v in config["benchmarks"]["dchag_variants"]
    ],
    "sequence": [f"{PAPER_B}/sequence.json"],
    "pipeline": [f"{PAPER_B}/pipeline.json"],
    "train_scaling": [f"{PAPER_B}/train_scaling.json"],
    "mfu": [f"{PAPER_B}/mfu.json"],
    "inference": [f"{PAPER_B}/inference.json"],
}
# Maps and spectra of the evaluation, copied under the paper's names.
PAPER_COPIES = {
    f"{PAPER_DIR}/{os.path.basename(f)}": f
    for f in FIGURES
    if os.path.basename(f).split("_")[0] in ("maps", "spectra")
}


rule paper_figure:
    input:
        lambda wildcards: PAPER_INPUTS[wildcards.figure],
    output:
        png=report(
            f"{PAPER_DIR}/{{figure}}.png",
            caption="../report/paper.rst",
            category="Paper",
            labels={"figure": "{figure}"},
        ),
        pdf=f"{PAPER_DIR}/{{figure}}.pdf",
        data=report(
            f"{PAPER_DIR}/{{figure}}.json",
            caption="../report/paper.rst",
            category="Paper",
            labels={"figure": "{figure}", "kind": "data"},
        ),
    log:
        "logs/paper/{figure}.log",
    wildcard_constraints:
        figure="|".join(PAPER_INPUTS),
    conda:
        "../../envs/cpu.yaml"
    params:
        script=os.path.join(BENCH_SCRIPTS, "paper_figures.py"),
    shell:
        "python {params.script:q} {wildcards.figure} --out {output.png:q} {input:q} > {log} 2>&1"


rule paper_table6:
    input:
        "results/evaluation/metrics.csv",
    output:
        md=report(
            f"{PAPER_DIR}/table6.md",
            caption="../report/paper.rst",
            category="Paper",
            labels={"figure": "table6 (skill)", "kind": "table"},
        ),
        csv=f"{PAPER_DIR}/table6.csv",
    log:
        "logs/paper/table6.log",
    conda:
        "../../envs/cpu.yaml"
    params:
        script=os.path.join(BENCH_SCRIPTS, "paper_figures.py"),
    shell:
        "python {params.script:q} table6 --out {output.md:q} {input:q} > {log} 2>&1"


rule paper_copy:
    input:
        lambda wildcards: PAPER_COPIES[f"{PAPER_DIR}/{wildcards.name}.png"],
    output:
        report(
            f"{PAPER_DIR}/{{name}}.png",
            caption="../report/paper.rst",
            category="Paper",
            labels={"figure": "{name}"},
        ),
    log:
        "logs/paper/copy_{name}.log",
    wildcard_constraints:
        name="(maps|spectra)_[A-Za-z0-9_]+",
    conda:
        "../../envs/cpu.yaml"
    shell:
        "cp -v {input:q} {output:q} > {log} 2>&1"


rule paper:
    input:
        [
            f"{PAPER_DIR}/{name}.{ext}"
            for name in PAPER_INPUTS
            for ext in ("png", "pdf", "json")
        ],
        f"{PAPER_DIR}/table6.md",
        list(PAPER_COPIES),
