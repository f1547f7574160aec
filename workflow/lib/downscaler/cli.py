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

from downscaler.config import stage_names
from downscaler.io import read_json, write_netcdf
from downscaler.settings import InferenceInput, build, typed
from downscaler.variables import calendar_names


def source(args, config: dict) -> None:
    from downscaler.sources.prepare import load_targets

    fields, static = load_targets(config, args.raw_dir)
    write_netcdf(static, args.static)
    write_netcdf(fields, args.fields)


def source_inputs(args, config: dict) -> None:
    from downscaler.sources.prepare import load_inputs

    write_netcdf(load_inputs(config, args.raw_dir), args.out)


def prepare_input(args, config: dict) -> None:
    from downscaler.pairs import calendar_features
    from downscaler.sources.prepare import open_inference_input, to_model_grid

    spec = config["inference_inputs"][args.name]
    with xr.open_dataset(args.coarse) as coarse:
        grid = coarse[["lat", "lon"]].load()
    typed_spec = build(InferenceInput, spec, f"inference_inputs.{args.name}")
    ds = to_model_grid(open_inference_input(typed_spec, config, args.raw_dir), grid)
    if config["inputs"]["calendar"]:
        ds = xr.merge([ds, calendar_features(ds["time"].values,
                                             calendar_names(config["frequency"]), ds)])
    ds.attrs.update(source=f"inference input {args.name!r}: {json.dumps(spec, sort_keys=True)}")
    write_netcdf(ds, args.out)


def pairs(args, config: dict) -> None:
    from downscaler.pairs import write_pairs

    # dask chunks along time only: each chunk is regridded and written on its own
    regrid = typed(config, "regrid")
    chunk = {"time": regrid.time_chunk}
    inputs = None
    if args.inputs != "none":
        inputs = xr.open_dataset(args.inputs, chunks=chunk)
    with xr.open_dataset(args.fields, chunks=chunk) as fields, xr.open_dataset(args.static) as st:
        write_pairs(fields, st, regrid, config["split"], stage_names(config),
                    args.fine, args.coarse, args.stats, inputs=inputs)
    if inputs is not None:
        inputs.close()


def tiles(args, config: dict) -> None:
    from downscaler.pairs import split_by_time
    from downscaler.tiles_store import write_tiles

    names = stage_names(config)
    with xr.open_dataset(args.fine) as fine, xr.open_dataset(args.coarse) as coarse:
        fine_part = split_by_time(fine, {args.split: config["split"][args.split]})[args.split]
        coarse_part = coarse.sel(time=fine_part["time"])
        write_tiles(fine_part, coarse_part, names["targets"], names["statics"],
                    read_json(args.stats), typed(config, "tiles"), args.out,
                    inputs=names["inputs"])


def train(args, config: dict) -> None:
    """Train on this process's share of the run (srun task, or spawns parallel.processes).

    A SIGTERM/SIGUSR1 stop saves a resumable state and exits with status 75 (EX_TEMPFAIL), so
    Slurm (RequeueExit=75) or Snakemake (retries) can start it again and it resumes.
    """
    from downscaler.launcher import TrainingInterrupted
    from downscaler.train import train as run_training

    try:
        summary = run_training(config, args.train, args.val, args.checkpoint, args.log)
    except TrainingInterrupted as stop:
        print(f"downscaler train: {stop}", file=sys.stderr)
        raise
    rank = os.environ.get("RANK", "0")
    if rank == "0":  # under srun every task runs this; one summary is enough
        print(json.dumps(summary))


def infer(args, config: dict) -> None:
    from downscaler.infer import MaskedTally, run_inference

    if args.split not in ("all", *config["split"]):
        raise ValueError(f"--split must be 'all' or one of {sorted(config['split'])}, "
                         f"got {args.split!r}")
    period = None if args.split == "all" else config["split"][args.split]
    tally = MaskedTally()
    sizes = run_inference(args.checkpoint, args.coarse, args.fine, args.out, period=period,
                          settings=typed(config, "infer"), architecture=args.architecture,
                          tally=tally)
    print(f"infer: wrote {sum(sizes)} time steps in {len(sizes)} chunks to {args.out}")
    print(f"infer: {tally.summary()}")


def _io_fallback(fine: xr.Dataset, coarse: xr.Dataset) -> tuple[list[str], list[str]]:
    """(inputs, targets) of pairs files without stats.json lists: their time-varying fields."""
    def timed(ds: xr.Dataset) -> list[str]:
        return [str(v) for v, da in ds.data_vars.items() if "time" in da.dims]

    return timed(coarse), timed(fine)


def fit_baselines(args, config: dict) -> None:
    """Fit the statistical baselines (residual climatology, MOS) on the training period."""
    from downscaler.evaluate import io_lists
    from downscaler.evaluation.statistical import fit_statistical
    from downscaler.pairs import split_by_time

    stats = read_json(args.stats)
    train_split = {"train": config["split"]["train"]}
    with xr.open_dataset(args.fine) as fine, xr.open_dataset(args.coarse) as coarse:
        inputs_fb, targets_fb = _io_fallback(fine, coarse)
        inputs, targets = io_lists(stats, targets_fb, inputs_fb)
        train = split_by_time(fine, train_split)["train"]
        fitted = fit_statistical(coarse, train, inputs, targets,
                                 time_chunk=config["evaluate"]["time_chunk"])
    write_netcdf(fitted, args.out)
    print(f"fit_baselines: residual climatology and MOS for {targets} from {inputs} over "
          f"{fitted.attrs['training_steps']} training steps")


def evaluate(args, config: dict) -> None:
    from downscaler.evaluate import (
        UPSAMPLE_VIT,
        io_lists,
        limit_netcdf_cache,
        run_evaluation,
        unavailable_notes,
        write_scores,
        write_training_curves,
    )
    from downscaler.infer import open_downscaled
    from downscaler.pairs import split_by_time

    limit_netcdf_cache()  # before any file is opened
    opts = typed(config, "evaluate")
    baselines = list(opts.baselines)
    test_split = {"test": config["split"]["test"]}
    stats = read_json(args.stats)
    fitted = None
    if args.fitted != "none":
        with xr.open_dataset(args.fitted) as f:
            fitted = f.load()
    learned = {}
    if args.upsample_vit != "none":
        learned[UPSAMPLE_VIT] = open_downscaled(args.upsample_vit)  # read chunk by chunk
    try:
        with (open_downscaled(args.downscaled) as ds, xr.open_dataset(args.fine) as fine,
              xr.open_dataset(args.coarse) as coarse):
            inputs_fb, _ = _io_fallback(fine, coarse)
            inputs, targets = io_lists(stats, list(ds.data_vars), inputs_fb)
            truth = split_by_time(fine, test_split)["test"]
            coarse_test = split_by_time(coarse, test_split)["test"]
            ev = run_evaluation(ds, coarse_test, truth, baselines, inputs=inputs,
                                targets=targets, fitted=fitted, learned=learned,
                                time_chunk=opts.time_chunk, map_time=opts.map_time)
    finally:
        for vit in learned.values():
            vit.close()
    table = ev.table()
    write_scores(table, args.metrics, args.table, args.verdict,
                 unavailable_notes(baselines, inputs, targets))
    write_training_curves(args.loss_log, args.figures)
    ev.write_figures(args.figures, table)
    missing = table[(table["metric"] == "missing_fraction") & (table["method"] == "reslim")]
    for _, row in missing.iterrows():
        print(f"evaluate: reslim has no value at {100 * row['value']:.4g}% of the valid truth "
              f"pixels of {row['variable']} (masked under missing inputs)")


def seams(args, config: dict) -> None:
    from downscaler.checkpoint import load_checkpoint
    from downscaler.evaluate import write_seams
    from downscaler.evaluation.seams import seam_errors, seam_settings
    from downscaler.pairs import split_by_time

    model, payload = load_checkpoint(args.checkpoint)
    opts, infer_opts = typed(config, "evaluate").seams, typed(config, "infer")
    test_split = {"test": config["split"]["test"]}
    with xr.open_dataset(args.coarse) as coarse, xr.open_dataset(args.fine) as fine:
        coarse_test = split_by_time(coarse, test_split)["test"]
        if opts.max_steps:
            coarse_test = coarse_test.isel(time=slice(0, opts.max_steps))
        errors = seam_errors(model, payload, coarse_test, fine,
                             seam_settings(payload, opts.whole_domain),
                             batch_size=infer_opts.batch_size,
                             time_chunk=infer_opts.time_chunk)
    t = payload["tiling"]
    write_seams(errors, args.csv, args.figure, halo_fine=t["halo"] * t["factor"])


def scaling(args, config: dict) -> None:
    from downscaler.evaluate import write_scaling

    write_scaling(args.results_dir, args.csv, args.figure)


STAGES = {
    "source": (source, ["raw_dir", "fields", "static"]),
    "source_inputs": (source_inputs, ["raw_dir", "out"]),
    "prepare_input": (prepare_input, ["name", "raw_dir", "coarse", "out"]),
    "pairs": (pairs, ["fields", "inputs", "static", "fine", "coarse", "stats"]),
    "tiles": (tiles, ["fine", "coarse", "stats", "split", "out"]),
    "train": (train, ["train", "val", "checkpoint", "log"]),
    "infer": (infer, ["checkpoint", "architecture", "coarse", "fine", "split", "out"]),
    "fit_baselines": (fit_baselines, ["fine", "coarse", "stats", "out"]),
    "evaluate": (evaluate, ["downscaled", "upsample_vit", "fitted", "fine", "coarse", "stats",
                            "loss_log", "metrics", "table", "verdict", "figures"]),
    "seams": (seams, ["checkpoint", "coarse", "fine", "csv", "figure"]),
    "scaling": (scaling, ["results_dir", "csv", "figure"]),
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
