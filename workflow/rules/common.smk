# Config validation (before any rule runs) and helpers shared by the rules.
import json
import os
import sys

from downscaler.config import ConfigError, validate_config
from downscaler.variables import short_names

try:
    config.update(validate_config(config))
except ConfigError as err:
    sys.exit(f"Invalid configuration: {err}")

VARIABLES = short_names(
    config["variables"]
)  # the targets: scored and plotted per variable
# PNGs (each with a PDF twin): per-variable ones from rule evaluate, the TILES seam check and
# the scaling plot from their own rules (workflow/rules/evaluate.smk).
FIGURE_KINDS = ("maps", "spectra", "pdfs", "scatter", "bias")
FIGURES = [
    "results/evaluation/figures/training_curves.png",
    "results/evaluation/figures/tiles_seams.png",
    "results/evaluation/figures/scaling.png",
] + [
    f"results/evaluation/figures/{kind}_{name}.png"
    for name in VARIABLES
    for kind in FIGURE_KINDS
]


def stage_config(*keys):
    """The config keys a stage reads, as JSON: a rule re-runs only when these change."""
    return json.dumps({key: config[key] for key in keys}, sort_keys=True)


def pairs_inputs(wildcards):
    """The pairs rule's inputs: the inputs file unless the inputs are the coarsened targets."""
    files = {"fields": "results/raw/fields.nc", "static": "results/raw/static.nc"}
    if config["inputs"]["source"] != "coarsened":
        files["inputs"] = "results/raw/inputs.nc"
    return files


def input_config(name):
    """Config slice for one inference input (so only its own entry triggers a re-run)."""
    if name not in config["inference_inputs"]:
        raise ValueError(f"no inference_inputs entry named {name!r} in the config")
    spec = {"inference_inputs": {name: config["inference_inputs"][name]}}
    keys = ("inputs", "frequency", "region", "period", "era5")
    return json.dumps({**{k: config[k] for k in keys}, **spec}, sort_keys=True)
