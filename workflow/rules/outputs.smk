# Output paths and report helpers of the infer and evaluate stages, included by infer.smk (so
# the Snakefile's targets may use them too): the downscaled files in the configured format, the
# figures' PDF twins and their report captions.
import glob

DOWNSCALED_SUFFIX = "zarr" if config["infer"]["format"] == "zarr" else "nc"
FIGURE_DIR = "results/evaluation/figures"
# Per-variable figures and the training curves come from rule evaluate; the seam check and the
# scaling plot have rules of their own.
SCORE_FIGURES = [
    f for f in FIGURES if os.path.basename(f).split("_")[0] in FIGURE_KINDS
]


def downscaled(name):
    """Path of the downscaled output NAME (results/downscaled/NAME.nc or .zarr, per infer.format)."""
    return f"results/downscaled/{name}.{DOWNSCALED_SUFFIX}"


def downscaled_output(name):
    """Rule output for downscaled(NAME): a directory() for zarr stores."""
    path = downscaled(name)
    return directory(path) if DOWNSCALED_SUFFIX == "zarr" else path


def pdf(path):
    """The PDF twin every figure function writes next to its PNG."""
    return path[: -len(".png")] + ".pdf"


def figure_report(path):
    """A per-variable figure as a report item: caption by figure kind, grouped by variable."""
    kind, name = os.path.basename(path)[: -len(".png")].split("_", 1)
    return report(
        path,
        caption=f"../report/{kind}.rst",
        category="Figures",
        subcategory=name,
        labels={"figure": kind, "variable": name},
    )


def optional_baselines(wildcards):
    """Baselines with inputs of their own: the statistical fit (rule fit_baselines) and the
    upsample-first ViT's prediction (listed in evaluate.baselines or its checkpoint given).
    """
    chosen = config["evaluate"]["baselines"]
    out = {}
    if {"residual_climatology", "mos"} & set(chosen):
        out["fitted"] = "results/evaluation/baselines_fitted.nc"
    if "upsample_vit" in chosen or config["evaluate"]["upsample_vit_checkpoint"]:
        out["upsample_vit"] = "results/downscaled/baselines/upsample_vit_test.nc"
    return out


def upsample_vit_checkpoint():
    """The upsample-first ViT scored as a baseline: evaluate.upsample_vit_checkpoint when given,
    else the one rule train_upsample_vit trains by the same training rule as Reslim."""
    given = config["evaluate"]["upsample_vit_checkpoint"]
    return given or "results/model/baselines/upsample_vit/checkpoint.pt"


# An ensemble run (infer.ensemble) also draws rank histograms.
ENSEMBLE = bool(
    config["infer"]["ensemble"]["mc_dropout"]
    or config["infer"]["ensemble"]["checkpoints"]
)
ENSEMBLE_FIGURES = [f"{FIGURE_DIR}/rank_histogram.png"] if ENSEMBLE else []


def ensemble_report(path):
    """The rank histogram of an ensemble run as a report item."""
    return report(
        path,
        caption="../report/rank_histogram.rst",
        category="Figures",
        subcategory="ensemble",
        labels={"figure": "rank histogram", "variable": "all"},
    )


def ensemble_figures():
    return [ensemble_report(f) for f in ENSEMBLE_FIGURES]


def benchmark_results(wildcards):
    """Whatever benchmark JSON exists now; a new or removed file re-runs the scaling rule."""
    return sorted(glob.glob(os.path.join(config["evaluate"]["benchmarks"], "*.json")))
