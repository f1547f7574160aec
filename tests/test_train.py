"""The training engine: distributed runs, resume after SIGTERM, NaN stop, fine-tuning, and
checkpoint round trips for each parallel layout."""

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from downscaler import checkpoint as ckpt
from downscaler.config import validate_config
from downscaler.launcher import EXIT_REQUEUE
from downscaler.model.presets import build_model
from downscaler.pairs import compute_stats, make_pairs
from downscaler.parallel import train_state
from downscaler.tiles_store import write_tiles
from downscaler.train import LOG_FIELDS, ResumableSampler, TrainingDiverged, train

from tests.conftest import REPO, random_fields

SMALL_MODEL = {"preset": "tiny", "embed_dim": 32, "depth": 1, "num_heads": 2,
               "residual_channels": 4}


def write_stores(root: Path, statics: list[str], halo: int = 1) -> tuple[str, str]:
    """Tiny train (24 days x 2 tiles) and val (6 days x 2 tiles) stores with these statics."""
    fields, static = random_fields(n_time=30, n_lat=16, n_lon=32, seed=5)
    fine, coarse = make_pairs(fields, static, factor=4)
    stats = compute_stats(fine.isel(time=slice(0, 24)), ["t2m", "tp", *statics])
    cfg = {"div_lat": 1, "div_lon": 2, "halo": halo, "pad_mode": "symmetric"}
    paths = []
    for split, sl in (("train", slice(0, 24)), ("val", slice(24, 30))):
        path = root / f"{split}.zarr"
        write_tiles(fine.isel(time=sl), coarse.isel(time=sl), ["t2m", "tp"], statics, stats,
                    cfg, str(path))
        paths.append(str(path))
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[str, str]:
    """Tiny stores with 2 variables and 3 statics."""
    return write_stores(tmp_path_factory.mktemp("tiles"), ["orog", "lsm", "latitude"])


@pytest.fixture(scope="module")
def even_stores(tmp_path_factory) -> tuple[str, str]:
    """Tiny stores for 2-way sp and D-CHAG: 2 variables + 2 statics (4 channels, split evenly
    over tp=2) and halo 2 (8x8 coarse tiles: 16 tokens of 2x2, split evenly over sp=2)."""
    return write_stores(tmp_path_factory.mktemp("tiles_even"), ["orog", "lsm"], halo=2)


def make_config(tmp: Path, processes: int = 1, parallel: dict | None = None,
                **train_opts) -> dict:
    opts = {"epochs": 4, "batch_size": 8, "workers": 0, "val_every_steps": 3, "patience": 0,
            "log_dir": str(tmp / "logs" / "train"), **train_opts}
    par = {"processes": processes, "device": "cpu", **(parallel or {})}
    # D-CHAG splits the channels over tp: the even stores have 2 variables + 2 statics
    statics = (["orography", "land_sea_mask"] if par.get("dchag")
               else ["orography", "land_sea_mask", "latitude"])
    return validate_config({"seed": 7, "model": SMALL_MODEL, "train": opts, "parallel": par,
                            "statics": statics})


def run_cli(config: dict, stores, out: Path, **popen) -> subprocess.Popen:
    """`python -m downscaler.cli train` as the rule runs it."""
    cmd = [sys.executable, "-m", "downscaler.cli", "train", "--config", json.dumps(config),
           "--train", stores[0], "--val", stores[1], "--checkpoint",
           str(out / "model" / "checkpoint.pt"), "--log", str(out / "model" / "log.csv")]
    # this checkout's package first (the venv may hold another checkout's, installed editable)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "workflow" / "lib"),
                                                        str(REPO)])}
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        env.pop(key, None)
    return subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    """The model weights of the finished run's last resumable state (torch.distributed.checkpoint
    format), as a plain state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = out / "final.pt"
    dcp_to_torch_save(out / "model" / "train_state" / "last" / "dcp", target)
    return torch.load(target, weights_only=False)["model"]


def test_sampler_gives_same_global_batches_for_any_dp_and_resumes_mid_epoch():
    one = list(ResumableSampler(40, 8, 0, 1, seed=3))
    halves = [list(ResumableSampler(40, 8, r, 2, seed=3)) for r in range(2)]
    for k in range(5):  # global batch k = rank 0's 4 samples then rank 1's
        assert one[8 * k:8 * k + 8] == halves[0][4 * k:4 * k + 4] + halves[1][4 * k:4 * k + 4]
    sampler = ResumableSampler(40, 8, 0, 1, seed=3)
    sampler.set_position(epoch=1, batch=2)
    later = list(sampler)
    sampler.set_position(epoch=1)
    assert later == list(sampler)[16:] and len(later) == 24
    assert sorted(list(sampler)) == list(range(40))  # a permutation, a new one per epoch
    assert list(sampler) != one
    with pytest.raises(ValueError, match="train.batch_size=8 must be divisible"):
        ResumableSampler(40, 8, 0, 3, seed=3)


@pytest.fixture(scope="module")
def two_process_run(stores, tmp_path_factory):
    """One uninterrupted 2-process (gloo) run through the CLI; the reference for resume."""
    out = tmp_path_factory.mktemp("full")
    config = make_config(out, processes=2)
    proc = run_cli(config, stores, out)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return out, config, json.loads(stdout.strip().splitlines()[-1])


def test_two_local_processes_end_to_end(two_process_run):
    out, _, summary = two_process_run
    assert summary["world_size"] == 2 and summary["steps"] == 4 * (48 // 8)
    model, payload = ckpt.load_checkpoint(out / "model" / "checkpoint.pt")
    assert payload["variables"] == ["t2m", "tp"] and payload["step"] == summary["best_step"]
    assert payload["val_loss"] == pytest.approx(summary["best_val_loss"])
    with open(out / "model" / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == LOG_FIELDS  # step,epoch,train_loss,val_loss,lr first
    val = [r for r in rows if r["val_loss"]]
    assert [int(r["step"]) for r in val] == [3, 6, 9, 12, 15, 18, 21, 24]
    assert min(float(r["val_loss"]) for r in val) == pytest.approx(summary["best_val_loss"])
    train_rows = [r for r in rows if r["train_loss"]]
    assert all(float(r["samples_per_s"]) > 0 and float(r["memory_mb"]) > 0 for r in train_rows)
    for rank in (0, 1):
        assert "val loss" in (out / "logs" / "train" / f"rank{rank}.log").read_text()


@pytest.mark.parametrize("layout", [{"sp": 2}, {"tp": 2, "dchag": "linear"}],
                         ids=["sp", "dchag"])
def test_two_process_layout_trains_and_its_checkpoint_downscales(layout, even_stores, tmp_path):
    """Sequence parallel and D-CHAG through the engine (2 gloo processes, the CLI), then the
    consolidated checkpoint on one process through inference."""
    from downscaler.infer import downscale

    config = make_config(tmp_path, processes=2, parallel=layout, epochs=1)
    proc = run_cli(config, even_stores, tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["steps"] == 48 // 8
    model, payload = ckpt.load_checkpoint(tmp_path / "model" / "checkpoint.pt")
    want = {"variant": "linear", "tp": 2} if layout.get("dchag") else None
    assert payload["dchag"] == want and payload["step"] == summary["best_step"]
    fields, static = random_fields(n_time=2, n_lat=16, n_lon=32, seed=9)
    fine, coarse = make_pairs(fields, static, factor=4)
    out = downscale(model, payload, coarse, fine, progress=False)
    for name in ("t2m", "tp"):
        assert out[name].shape == fine[name].shape
        assert np.isfinite(out[name].values).all(), name


def test_sigterm_then_resume_matches_uninterrupted_run(stores, two_process_run, tmp_path):
    reference, config, summary = two_process_run
    proc = run_cli(config, stores, tmp_path)
    state = tmp_path / "model" / "train_state" / "last" / "meta.pt"
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # Slurm's signal before the time limit
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, stderr[-3000:]
    assert "resumable state saved" in stderr
    stopped_at = torch.load(state, weights_only=False)["step"]
    assert 0 < stopped_at < summary["steps"]
    assert not (tmp_path / "model" / "checkpoint.pt").exists()  # the rule's output is not done

    proc = run_cli(config, stores, tmp_path)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    resumed = json.loads(stdout.strip().splitlines()[-1])
    assert resumed["resumed_from"] == stopped_at and resumed["steps"] == summary["steps"]
    expected, got = final_weights(reference), final_weights(tmp_path)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    assert resumed["best_val_loss"] == pytest.approx(summary["best_val_loss"], abs=1e-6)
    with open(tmp_path / "model" / "log.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["val_loss"]]
    assert steps == [3, 6, 9, 12, 15, 18, 21, 24]  # one row per validation, none repeated


def test_nan_loss_stops_clearly_and_keeps_last_good_state(stores, tmp_path):
    config = make_config(tmp_path, lr=1e30, grad_clip=0.0, val_every_steps=1, epochs=2)
    with pytest.raises(TrainingDiverged, match="loss became .* at step") as err:
        train(config, *stores, str(tmp_path / "model" / "checkpoint.pt"),
              str(tmp_path / "model" / "log.csv"))
    assert "last good resumable state" in str(err.value)
    meta = torch.load(tmp_path / "model" / "train_state" / "last" / "meta.pt",
                      weights_only=False)
    assert 1 <= meta["step"] < 12 and not meta["finished"]
    assert not (tmp_path / "model" / "checkpoint.pt").exists()


def test_init_from_matches_variables_by_name_and_drops_mismatched_heads(tmp_path):
    torch.manual_seed(0)
    old = build_model("tiny", ["t2m", "tp"], ["t2m", "tp"], ["orog"], embed_dim=32,
                      num_heads=2)
    ckpt.save_checkpoint(tmp_path / "old.pt", old)
    new = build_model("tiny", ["u10", "t2m"], ["t2m"], ["orog", "lsm"], embed_dim=32,
                      num_heads=2)
    fresh = {k: v.clone() for k, v in new.state_dict().items()}
    report = ckpt.load_matching_weights(new, tmp_path / "old.pt")
    state, old_state = new.state_dict(), old.state_dict()
    # t2m was input 0, is now input 1; u10 is new and keeps its initialisation
    assert torch.equal(state["tokenizer.inputs.embeds.1.weight"],
                       old_state["tokenizer.inputs.embeds.0.weight"])
    assert torch.equal(state["tokenizer.inputs.channel_embed"][1],
                       old_state["tokenizer.inputs.channel_embed"][0])
    assert torch.equal(state["tokenizer.inputs.embeds.0.weight"],
                       fresh["tokenizer.inputs.embeds.0.weight"])
    assert torch.equal(state["blocks.0.attn.qkv.weight"], old_state["blocks.0.attn.qkv.weight"])
    assert "head_conv.weight" in report["skipped"]  # 2 outputs before, 1 now
    assert torch.equal(state["head_conv.weight"], fresh["head_conv.weight"])
    assert "tokenizer.statics.embeds.1.weight" in report["new"]
    with pytest.raises(RuntimeError, match="train.init_from"):
        ckpt.load_matching_weights(new, tmp_path / "missing.pt")


def _check_dchag_grad_norm(build, mesh, fresh, x, static, y, variant):
    """The engine's gradient clipping measures the single-process D-CHAG model's gradient norm.

    Only the D-CHAG modules' gradients are kept (on both models): the rest of this tiny model
    dwarfs them, so a wrong D-CHAG share would hide in the total.
    """
    from downscaler.parallel.clip import clip_grad_norm_
    from downscaler.parallel.dchag import PRIVATE_PREFIXES, is_tp_distinct, reference_model

    model, _ = build()
    torch.manual_seed(0)
    ref = reference_model(fresh(), 2, variant)
    for m in (model, ref):
        ((m(x, static, 100.0) - y) ** 2).mean().backward()
        for name, p in m.named_parameters():
            if not name.startswith(PRIVATE_PREFIXES):
                p.grad = None
    want = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
    got = float(clip_grad_norm_(model, 1e9, mesh["tp"].get_group(), is_tp_distinct))
    assert got == pytest.approx(want, rel=1e-5)


def _round_trip(rank, world, layout_sizes, state_dir):
    """Train one step under a layout, save, reload into a fresh copy: same weights and optimizer
    state, and a consolidated checkpoint that load_checkpoint turns into the same function."""
    from downscaler.parallel import Layout, build_mesh, parallelize, reduce_gradients

    # D-CHAG splits in_vars + static_vars over tp = 2: two statics make four channels.
    statics = ["orog", "lsm"] if layout_sizes.get("dchag") else ["orog"]

    def fresh():
        return build_model("tiny", ["t2m", "tp"], ["t2m", "tp"], statics, embed_dim=32,
                           num_heads=2, depth=1)

    def build():
        torch.manual_seed(0)
        model = parallelize(fresh(), layout, mesh)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    layout = Layout.from_config(layout_sizes)
    mesh = build_mesh(layout, "cpu")

    torch.manual_seed(1)
    x, static = torch.randn(2, 2, 8, 8), torch.randn(2, len(statics), 32, 32)
    y = torch.randn(2, 2, 32, 32)
    model, opt = build()
    ((model(x, static, 100.0) - y) ** 2).mean().backward()
    reduce_gradients(model, layout, mesh)  # as the engine does (sums sp's partial gradients)
    if layout.dchag is not None:
        _check_dchag_grad_norm(build, mesh, fresh, x, static, y, layout.dchag)
    opt.step()
    train_state.save_train_state(state_dir, model, opt, {"step": 1}, {"rng": torch.get_rng_state()})
    full = train_state.full_model_state(model)
    dchag = train_state.dchag_metadata(model)
    assert dchag == ({"variant": layout_sizes["dchag"], "tp": 2}
                     if layout_sizes.get("dchag") else None)
    model2, opt2 = build()  # the initial weights: the trained step must come from the state
    path = train_state.find_train_state(state_dir)
    meta, rank_state = train_state.load_train_state(path, model2, opt2)
    assert meta == {"step": 1} and rank_state is not None
    full2 = train_state.full_model_state(model2)
    if rank == 0:
        assert full.keys() == full2.keys()
        for k in full:
            assert torch.equal(full[k], full2[k]), k
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    s1, s2 = get_optimizer_state_dict(model, opt), get_optimizer_state_dict(model2, opt2)
    assert s1["state"].keys() == s2["state"].keys()
    for key in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq"):
            a, b = s1["state"][key][name], s2["state"][key][name]
            a, b = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (a, b))
            assert torch.equal(a, b), (key, name)
    # Every rank's own D-CHAG weights came back (not rank 0's copy under the same name).
    local = {k: v.detach().clone() for k, v in model.state_dict().items()
             if not hasattr(v, "full_tensor")}
    for k, v in model2.state_dict().items():
        if k in local:
            assert torch.equal(local[k], v), k
    model.eval()
    with torch.no_grad():
        distributed = model(x, static, 100.0)  # collective for tp / sp / D-CHAG
    if rank == 0:
        path = Path(state_dir) / "consolidated.pt"
        ckpt.write_checkpoint(path, fresh().cfg.__dict__, full, dchag=dchag)
        plain, payload = ckpt.load_checkpoint(path)
        assert payload["dchag"] == dchag
        with torch.no_grad():
            out = plain(x, static, 100.0)
        torch.testing.assert_close(out, distributed, rtol=0, atol=1e-5)
        return out.tolist()  # a list: tensors do not travel through the result queue
    return None


ROUND_TRIP_LAYOUTS = {"ddp": {"dp_replicate": 2}, "fsdp": {"dp_shard": 2}, "tp": {"tp": 2},
                      "sp": {"sp": 2}, "dchag": {"tp": 2, "dchag": "linear"}}


def _round_trips(rank, world, layouts, root):
    """Every layout's round trip in one spawned world (process start-up dominates)."""
    return {name: _round_trip(rank, world, sizes, str(Path(root) / name))
            for name, sizes in layouts.items()}


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    from downscaler.launcher import spawn

    root = tmp_path_factory.mktemp("round_trips")
    return spawn(_round_trips, 2, ROUND_TRIP_LAYOUTS, str(root), timeout=600)[0]


@pytest.mark.parametrize("layout", list(ROUND_TRIP_LAYOUTS))
def test_checkpoint_round_trip_per_layout(round_trips, layout):
    out = round_trips[layout]
    assert out is not None and torch.isfinite(torch.tensor(out)).all()


def test_deepspeed_engine_missing_is_a_clear_error(stores, tmp_path, monkeypatch):
    """Without the deepspeed package, engine: deepspeed stops at once naming the config key
    (the engine itself is compared with one process in tests/test_engine.py)."""
    import builtins

    real_import = builtins.__import__

    def no_deepspeed(name, *args, **kwargs):
        if name == "deepspeed" or name.endswith("deepspeed_engine"):
            raise ImportError("No module named 'deepspeed'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    config = make_config(tmp_path, epochs=1)
    config["parallel"]["engine"] = "deepspeed"
    with pytest.raises(ImportError, match="parallel.engine is 'deepspeed'.*pip install"):
        train(config, *stores, str(tmp_path / "ckpt.pt"), str(tmp_path / "log.csv"))


def test_inference_checkpoint_loading_imports_no_distributed_code(tmp_path):
    """A D-CHAG checkpoint rebuilds on one process through downscaler.checkpoint alone: no
    downscaler.parallel / launcher module is imported (fresh interpreter)."""
    from downscaler.model.dchag_reference import reference_model

    torch.manual_seed(0)
    model = reference_model(build_model("tiny", ["t2m", "tp"], ["t2m", "tp"], ["orog", "lsm"],
                                        embed_dim=32, num_heads=2, depth=1), 2, "cross")
    path = tmp_path / "dchag.pt"
    ckpt.write_checkpoint(path, dataclasses.asdict(model.cfg), model.state_dict(),
                          dchag={"variant": "cross", "tp": 2})
    code = ("import sys; from downscaler.checkpoint import load_checkpoint; "
            f"m, p = load_checkpoint({str(path)!r}); "
            "print(sorted(k for k in sys.modules if k.startswith(('downscaler.parallel', "
            "'downscaler.launcher')))); print(p['dchag'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "workflow" / "lib")},
                         check=True).stdout.splitlines()
    assert out[-2:] == ["[]", "{'variant': 'cross', 'tp': 2}"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_budget_early_stopping_and_convergence_note(stores, tmp_path):
    """Training ends at the first of epochs / max_steps / max_minutes, or by early stopping; a
    run that ends while the val loss still falls says so in the log and the metrics CSV."""
    def run(name, **opts):
        out = tmp_path / name
        summary = train(make_config(out, **opts), *stores, str(out / "ckpt.pt"),
                        str(out / "log.csv"))
        return summary, _rows(out / "log.csv")

    summary, rows = run("steps", max_steps=5, val_every_steps=2, lr=2e-2, warmup_epochs=0.5)
    assert summary["steps"] == 5 and not summary["out_of_time"]
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [2, 4, 5]
    assert float([r for r in rows if r["lr"]][-1]["lr"]) == 0.0  # the schedule ends at step 5
    note = [r["note"] for r in rows if r["note"]]
    assert summary["converged"] is (not note)
    if note:
        assert note[0].startswith("not converged") and int(rows[-1]["step"]) == 5

    summary, rows = run("minutes", max_minutes=1e-6,
                        parallel={"activation_checkpointing": True})  # via parallelize
    assert summary["out_of_time"] and summary["steps"] == 1
    assert [int(r["step"]) for r in rows if r["val_loss"]] == [1]  # validated before ending

    summary, rows = run("patience", lr=1e-9, val_every_steps=1, patience=2, min_delta=0.5)
    assert summary["stopped_early"] and summary["steps"] == 3 and summary["best_step"] == 1
    assert summary["converged"]  # early stopping is not "still falling"


def test_layout_is_checked_at_config_time():
    from downscaler.config import ConfigError

    with pytest.raises(ConfigError, match="parallel.*nearest valid choice.*tp: 2") as err:
        validate_config({"model": SMALL_MODEL, "parallel": {"processes": 2, "tp": 3}})
    assert str(err.value).count("\n") <= 3  # one message
    with pytest.raises(ConfigError, match="num_heads=2 is not divisible by tp\\*sp"):
        validate_config({"model": SMALL_MODEL, "parallel": {"processes": 4, "tp": 4}})
    with pytest.raises(ConfigError, match="deepspeed.*set parallel.dp_shard, tp, sp and pp to 1"):
        validate_config({"model": SMALL_MODEL,
                         "parallel": {"processes": 2, "engine": "deepspeed", "tp": 2}})
    validate_config({"model": SMALL_MODEL, "parallel": {"processes": 4, "tp": 2}})  # fine
