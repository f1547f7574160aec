"""Command-line entry points, one per workflow stage: `python -m downscaler.cli STAGE ...`.

Each is a thin wrapper that opens inputs, calls the stage's library function and writes outputs;
the Snakemake rules call these (so the same line runs under `srun` on a cluster). The stage's
slice of the validated config arrives as JSON in --config. Expected problems (bad input files,
bad values) end with one line on stderr; set DOWNSCALER_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import xarray as xr

from downscaler.io import read_json, write_json, write_netcdf
from downscaler.variables import short_names


def source(args, config: dict) -> None:
    from downscaler.sources.prepare import load_training_source

    fields, static = load_training_source(config, args.raw_dir)
    write_netcdf(static, args.static)
    write_netcdf(fields, args.fields)


def prepare_input(args, config: dict) -> None:
    from downscaler.sources.prepare import open_inference_input, to_model_grid

    spec = config["inference_inputs"][args.name]
    with xr.open_dataset(args.coarse) as coarse:
        grid = coarse[["lat", "lon"]].load()
    ds = to_model_grid(open_inference_input(spec, config), grid)
    ds.attrs.update(source=f"inference input {args.name!r}: {json.dumps(spec, sort_keys=True)}")
    write_netcdf(ds, args.out)


def pairs(args, config: dict) -> None:
    from downscaler.pairs import compute_stats, make_pairs, split_by_time

    chunk = {"time": config["regrid"]["time_chunk"]}
    with xr.open_dataset(args.fields, chunks=chunk) as fields, xr.open_dataset(args.static) as st:
        fine, coarse = make_pairs(fields, st, config["regrid"]["factor"],
                                  config["regrid"]["backend"])
        train = split_by_time(fine, config["split"])["train"]
        names = short_names(config["variables"]) + short_names(config["statics"])
        write_json(compute_stats(train, names), args.stats)
        write_netcdf(fine, args.fine)
        write_netcdf(coarse, args.coarse)


def tiles(args, config: dict) -> None:
    from downscaler.pairs import split_by_time
    from downscaler.tiles_store import write_tiles

    with xr.open_dataset(args.fine) as fine, xr.open_dataset(args.coarse) as coarse:
        fine_part = split_by_time(fine, {args.split: config["split"][args.split]})[args.split]
        coarse_part = coarse.sel(time=fine_part["time"])
        write_tiles(fine_part, coarse_part, short_names(config["variables"]),
                    short_names(config["statics"]), read_json(args.stats), config["tiles"],
                    args.out)


def train(args, config: dict) -> None:
    from downscaler.train import train as run_training

    summary = run_training(config, args.train, args.val, args.checkpoint, args.log)
    print(json.dumps(summary))


def infer(args, config: dict) -> None:
    from downscaler.checkpoint import file_sha256, load_checkpoint
    from downscaler.infer import downscale, write_downscaled
    from downscaler.pairs import split_by_time

    model, payload = load_checkpoint(args.checkpoint)
    with xr.open_dataset(args.coarse) as coarse, xr.open_dataset(args.fine) as fine:
        test = split_by_time(coarse, {"test": config["split"]["test"]})["test"]
        out = downscale(model, payload, test, fine[payload["statics"]],
                        batch_size=config["infer"]["batch_size"], blend=config["infer"]["blend"])
    write_downscaled(out, args.out, payload, file_sha256(args.checkpoint))


def evaluate(args, config: dict) -> None:
    from downscaler.evaluate import predictions, write_figures, write_scores
    from downscaler.pairs import split_by_time

    test_split = {"test": config["split"]["test"]}
    with (xr.open_dataset(args.downscaled) as ds, xr.open_dataset(args.fine) as fine,
          xr.open_dataset(args.coarse) as coarse):
        truth = split_by_time(fine, test_split)["test"][list(ds.data_vars)].load()
        coarse_test = split_by_time(coarse, test_split)["test"].load()
        preds = predictions(ds.load(), coarse_test, truth, config["evaluate"]["baselines"])
        write_scores(preds, truth, args.metrics, args.table)
        write_figures(preds, coarse_test, truth, args.loss_log, args.figures,
                      config["evaluate"]["map_time"])


STAGES = {
    "source": (source, ["raw_dir", "fields", "static"]),
    "prepare_input": (prepare_input, ["name", "coarse", "out"]),
    "pairs": (pairs, ["fields", "static", "fine", "coarse", "stats"]),
    "tiles": (tiles, ["fine", "coarse", "stats", "split", "out"]),
    "train": (train, ["train", "val", "checkpoint", "log"]),
    "infer": (infer, ["checkpoint", "coarse", "fine", "out"]),
    "evaluate": (evaluate, ["downscaled", "fine", "coarse", "loss_log", "metrics", "table",
                            "figures"]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="downscaler", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="stage", required=True)
    for name, (_, options) in STAGES.items():
        stage = sub.add_parser(name)
        stage.add_argument("--config", required=True, help="the stage's config slice as JSON")
        for option in options:
            stage.add_argument(f"--{option.replace('_', '-')}", required=True)
    args = parser.parse_args(argv)
    function = STAGES[args.stage][0]
    try:
        function(args, json.loads(args.config))
    except (ValueError, KeyError, FileNotFoundError, ImportError, RuntimeError) as err:
        if os.environ.get("DOWNSCALER_DEBUG"):
            raise
        print(f"downscaler {args.stage}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
