"""The training loop: Reslim on TILES patches, on one process or many (DDP/FSDP/TP/SP/DeepSpeed).

ORBIT-2's recipe (AdamW betas 0.9/0.99, linear warm-up then cosine decay per step, the
TV-regularised loss with per-variable weights) plus what a real cluster needs: a distributed,
resumable sampler (the same global batches for any data-parallel size), validation every N steps
with early stopping, gradient clipping, bf16 autocast where the device has it, atomic resumable
checkpoints (exact step, data order, optimizer, scheduler and RNG state), a save-and-exit on
SIGTERM/SIGUSR1 (Slurm's warning before the time limit), a clear stop on NaN/inf, and metrics
(CSV, TensorBoard when installed, a progress bar on rank 0, one log file per rank).

``train(config, train_path, val_path, checkpoint_path, log_path)`` is what the CLI calls; the
launcher turns it into one ``run_rank`` call per rank. The engine (model as trained, optimizer,
step, saved state) is ``parallel.engine``; the samplers are ``downscaler.samplers``. Training
ends at ``train.epochs``, ``train.max_steps`` or ``train.max_minutes``, whichever comes first, or
by early stopping; the best checkpoint by validation loss is the one published, and a run that
ends while the validation loss still falls steeply says so (log warning, ``note`` in the CSV).
The resumable state lives in ``<checkpoint dir>/train_state/``; the best weights are written as
a consolidated checkpoint (``checkpoint_path``, read by ``checkpoint.load_checkpoint``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from downscaler import checkpoint as ckpt
from downscaler.io import atomic_path
from downscaler.launcher import EXIT_REQUEUE, TrainingInterrupted, launch, resolve_device
from downscaler.model.loss import tv_regularised_loss
from downscaler.model.presets import build_model
from downscaler.parallel.engine import build_engine
from downscaler.parallel.train_state import find_train_state
from downscaler.samplers import ResumableSampler, ValidationShard
from downscaler.tiles_store import TileDataset
from downscaler.train_config import ParallelConfig, TrainConfig, from_validated
from downscaler.train_log import LOG_FIELDS, MetricsLog, memory_mb, setup_logging, teardown_logging
from downscaler.variables import BY_SHORT_NAME

__all__ = ["LOG_FIELDS", "ResumableSampler", "TrainingDiverged", "run_rank", "train",
           "warmup_cosine"]

STATE_DIR_NAME = "train_state"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Config keys that do not change the numbers, so a resume may differ in them (e.g. a run stopped
# by Slurm may be resumed with another time budget).
_NON_NUMERIC_KEYS = {"parallel": None,
                     "train": ("workers", "threads", "log_dir", "resume", "max_minutes")}
# Not converged: the val loss fell by more than this fraction per validation over the last
# three validations when training ended.
STILL_FALLING = 0.01

log = logging.getLogger("downscaler.train")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good resumable state is kept."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def variable_weights(config: dict, variables: list[str]) -> torch.Tensor:
    """Per-variable loss weights from config (long names), 1 where not given."""
    weights = config["train"]["variable_weights"]
    return torch.tensor([weights.get(BY_SHORT_NAME[v].long_name, 1.0) for v in variables])


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers ignore Slurm's signals: the main process saves and shuts them down."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def _shutdown_workers(loader: DataLoader) -> None:
    """Stop persistent DataLoader workers gracefully, now.

    They ignore SIGTERM (see above), and Python's exit handler stops leftover daemon processes
    with SIGTERM and then joins them: without this the process would never exit.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def config_fingerprint(config: dict) -> str:
    """Hash of the config keys that change the numbers; a resume requires the same one."""
    reduced = {}
    for key, value in config.items():
        drop = _NON_NUMERIC_KEYS.get(key, ())
        if drop is None:
            continue
        reduced[key] = ({k: v for k, v in value.items() if k not in drop}
                        if isinstance(value, dict) and drop else value)
    return hashlib.sha256(json.dumps(reduced, sort_keys=True, default=str).encode()).hexdigest()


def train(config: dict, train_path: str, val_path: str, checkpoint_path: str,
          log_path: str) -> dict:
    """Train from the tile stores; write the best checkpoint and the metrics CSV.

    ``config`` is validated by ``config.validate_config`` (which fills the schema's defaults).
    Runs on every rank of the launcher's world (srun tasks, torchrun, or ``parallel.processes``
    local processes). Returns rank 0's summary; raises ``TrainingInterrupted`` (exit status 75)
    after saving on SIGTERM/SIGUSR1.
    """
    _, par = from_validated(config)
    return launch(run_rank, par.processes, resolve_device(par.device), config, train_path,
                  val_path, checkpoint_path, log_path)


class _StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT; checked (and agreed on by all ranks) once per step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    def requested(self, step: int) -> bool:
        """Whether to save and stop before training step ``step``."""
        return self.signum is not None

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _all_max(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def run_rank(device: torch.device, config: dict, train_path: str, val_path: str,
             checkpoint_path: str, log_path: str, stop: Any = None) -> dict:
    """The training loop on this rank, inside the launcher's process group (if any).

    ``stop`` (default: SIGTERM/SIGUSR1/SIGINT) has ``requested(step) -> bool``; when it says so
    on any rank, every rank saves the resumable state and raises ``TrainingInterrupted``.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    opts, par = from_validated(config)
    handler = setup_logging(log, opts.log_dir, rank)
    try:
        threads = opts.threads
        if not threads and world > 1 and device.type == "cpu":  # ranks share the cores
            threads = max(1, (os.cpu_count() or 1) // world)
        if threads:
            torch.set_num_threads(threads)
        with _StopFlag() as flag:
            loop = _Loop(device, config, opts, par, train_path, val_path, checkpoint_path,
                         log_path, rank, world, flag if stop is None else stop)
            return loop.run()
    finally:
        teardown_logging(log, handler)


class _Loop:
    """State and steps of one training run on one rank."""

    def __init__(self, device: torch.device, config: dict, opts: TrainConfig,
                 par: ParallelConfig, train_path: str, val_path: str, checkpoint_path: str,
                 log_path: str, rank: int, world: int, stop: Any) -> None:
        self.device, self.config, self.rank, self.world = device, config, rank, world
        self.opts, self.stop, self.seed = opts, stop, config["seed"]
        self.checkpoint_path, self.log_path = Path(checkpoint_path), Path(log_path)
        self.state_dir = self.checkpoint_path.parent / STATE_DIR_NAME
        # the mask marks valid targets (land-only data have NaN over sea)
        self.train_set = TileDataset(train_path, return_mask=True)
        self.val_set = TileDataset(val_path, return_mask=True)
        attrs = self.attrs = self.train_set.attrs
        self.variables, self.statics = attrs["variables"], attrs["statics"]
        self.res_km = attrs["res_km"]
        if self.val_set.attrs["variables"] != self.variables:
            raise ValueError(f"train and val tiles hold different variables "
                             f"({self.variables} vs {self.val_set.attrs['variables']}); "
                             "rebuild the tiles from one config")

        torch.manual_seed(self.seed)  # every rank builds identical initial weights
        overrides = {k: v for k, v in config["model"].items()
                     if k not in ("preset", "architecture")}
        # inputs may differ from the targets (other datasets, pressure levels, calendar)
        inputs = attrs.get("inputs", self.variables)
        self.architecture = config["model"]["architecture"]
        base = build_model(config["model"]["preset"], inputs, self.variables,
                           self.statics, architecture=self.architecture, mag=attrs["factor"],
                           **overrides)
        self.model_config = dataclasses.asdict(base.cfg)
        # batches are cast to the weights' dtype (float64 models for exact parity tests)
        self.dtype = next(base.parameters()).dtype
        self.init_report = None
        if opts.init_from:
            self.init_report = ckpt.load_matching_weights(base, opts.init_from)
            log.info("init_from %s: loaded %d tensors, skipped %d mismatched %s, %d new %s",
                     opts.init_from, len(self.init_report["loaded"]),
                     len(self.init_report["skipped"]), self.init_report["skipped"],
                     len(self.init_report["new"]), self.init_report["new"])
        # transformer tokens of one tile: what parallel.layout: auto plans for
        h, w, p = *self.train_set.x.shape[-2:], base.cfg.patch_size
        self.engine = build_engine(base, opts, par, device, world, tokens=(h // p) * (w // p))

        self.sampler = ResumableSampler(len(self.train_set), opts.batch_size,
                                        self.engine.dp_rank, self.engine.dp_size, self.seed)
        self.steps_per_epoch = self.sampler.batches
        if self.steps_per_epoch == 0:
            raise ValueError(f"config key train.batch_size={opts.batch_size} is larger than the "
                             f"{len(self.train_set)} training tiles; lower it")
        pin = device.type == "cuda"
        self.loader = DataLoader(self.train_set, batch_size=self.sampler.local_batch,
                                 sampler=self.sampler, num_workers=opts.workers, pin_memory=pin,
                                 persistent_workers=opts.workers > 0,
                                 worker_init_fn=_ignore_stop_signals if opts.workers else None)
        # the same number of validation batches on every data-parallel rank (padded)
        self.val_loader = DataLoader(
            ValidationShard(self.val_set, self.engine.dp_rank, self.engine.dp_size),
            batch_size=self.sampler.local_batch, num_workers=0, pin_memory=pin)
        self.total_steps = opts.epochs * self.steps_per_epoch
        if opts.max_steps:
            self.total_steps = min(self.total_steps, opts.max_steps)
        warmup = max(1, round(opts.warmup_epochs * self.steps_per_epoch))
        total = self.total_steps

        def factor(s: int) -> float:
            return warmup_cosine(s, warmup, total)

        self.scheduler = self.engine.scheduler(factor)
        self.val_every = opts.val_every_steps or self.steps_per_epoch
        self.log_every = opts.log_every_steps or max(1, self.steps_per_epoch // 5)
        self.autocast_dtype = self.engine.autocast_dtype
        self.weights = variable_weights(config, self.variables).to(device, self.dtype)
        self.fingerprint = config_fingerprint(config)
        self.step, self.best_val, self.best_step, self.bad_validations = 0, math.inf, 0, 0
        self.val_history: list[tuple[int, float]] = []
        self.resumed_from = None
        self.deadline = (time.monotonic() + 60 * opts.max_minutes if opts.max_minutes
                         else math.inf)
        self.metrics_path = self.state_dir / "metrics.csv"
        self.best_path = self.state_dir / "best.pt"
        self.metrics: MetricsLog | None = None  # rank 0's

    # -- pieces ---------------------------------------------------------------------------
    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        # at least float32 (bf16 autocast output is promoted; float64 stays float64)
        pred = pred.to(torch.promote_types(pred.dtype, torch.float32))
        return tv_regularised_loss(pred, target.to(pred.dtype), var_weights=self.weights,
                                   tv_weight=self.opts.tv_weight, mask=mask)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(self.device, self.dtype if t.is_floating_point() else None,
                     non_blocking=True) for t in tensors]

    @torch.no_grad()
    def validate(self) -> float:
        """Mean over the validation tiles of each tile's loss (independent of the batching and
        the number of data-parallel ranks; padding tiles weigh 0)."""
        self.engine.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for batch in self.val_loader:
            *batch, weight = batch
            x, static, y, mask = self.to_device(*batch)
            weight = weight.to(self.device, torch.float64)
            with self.autocast():
                if self.engine.pipeline is None:
                    pred = self.engine.model(x, static, self.res_km)
                else:  # the last stage predicts; the others add nothing to either sum
                    pred = self.engine.pipeline.predict(x, static, self.res_km)
                    if pred is None:
                        continue
            for i in range(len(x)):
                sl = slice(i, i + 1)
                total += self.loss_fn(pred[sl], y[sl], mask[sl]).double() * weight[i]
            count += weight.sum()
        self.engine.model.train()
        # tp/sp ranks repeat their dp rank's sums, which scales both sums alike
        pair = torch.stack([total, count])
        if dist.is_initialized():
            dist.all_reduce(pair)
        return float(pair[0] / pair[1].clamp(min=1))

    def state_dict(self, finished: bool = False) -> dict:
        """The loop's own resumable state (the engine saves model and optimizer)."""
        return {"step": self.step, "scheduler": self.scheduler.state_dict(),
                "best_val": self.best_val, "best_step": self.best_step,
                "bad_validations": self.bad_validations, "val_history": self.val_history,
                "fingerprint": self.fingerprint, "dp_size": self.engine.dp_size,
                "world_size": self.world, "finished": finished, "engine": self.engine.kind}

    def load_state_dict(self, meta: dict) -> None:
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.best_val = meta["step"], meta["best_val"]
        self.best_step, self.bad_validations = meta["best_step"], meta["bad_validations"]
        self.val_history = [tuple(v) for v in meta.get("val_history", [])]

    def rank_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_state(self, finished: bool = False) -> None:
        t0 = time.perf_counter()
        path = self.engine.save(self.state_dir, self.state_dict(finished), self.rank_state())
        log.info("saved resumable state at step %d to %s (%.1f s)", self.step, path,
                 time.perf_counter() - t0)

    def try_resume(self) -> None:
        """Continue from the committed state if it belongs to this config and is unfinished."""
        if not self.opts.resume:
            return
        path = find_train_state(self.state_dir)
        if path is None:
            return
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
        why = None
        if meta.get("fingerprint") != self.fingerprint:
            why = "it was written with a different config"
        elif meta.get("finished"):
            why = "that run had finished"
        elif meta.get("engine") != self.engine.kind:
            why = f"it was written by the {meta.get('engine')} engine"
        if why:
            log.info("not resuming from %s: %s; starting afresh", path, why)
            return
        meta, rank_state = self.engine.load(path)
        self.load_state_dict(meta)
        if rank_state is not None and meta["world_size"] == self.world:
            torch.set_rng_state(rank_state["torch"])
            if "cuda" in rank_state and self.device.type == "cuda":
                torch.cuda.set_rng_state(rank_state["cuda"], self.device)
        if meta["dp_size"] != self.engine.dp_size:
            log.info("data-parallel size changed (%d -> %d): global batches stay the same, "
                     "RNG streams restart", meta["dp_size"], self.engine.dp_size)
        self.resumed_from = self.step
        log.info("resumed from %s at step %d of %d", path, self.step, self.total_steps)

    def save_best(self, val_loss: float) -> None:
        state = self.engine.full_state()  # collective
        if self.rank == 0:
            tiling = {k: self.attrs[k] for k in ("div_lat", "div_lon", "halo", "pad_mode",
                                                 "factor")}
            ckpt.write_checkpoint(
                self.best_path, self.model_config, state, variables=self.variables,
                statics=self.statics, stats=self.attrs["stats"], tiling=tiling,
                res_km=self.res_km, config=self.config,
                epoch=math.ceil(self.step / self.steps_per_epoch), step=self.step,
                val_loss=val_loss, dchag=self.engine.dchag, architecture=self.architecture)

    def out_of_time(self) -> bool:
        return time.monotonic() > self.deadline

    # -- the loop -------------------------------------------------------------------------
    def train_step(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimizer step on this rank's share of a global batch; returns (loss, grad norm)."""
        x, static, y, mask = self.to_device(*batch)
        if self.engine.pipeline is not None:  # the schedule runs forward and backward at once
            with self.autocast():
                loss = self.engine.forward_backward(x, static, y, mask, self.res_km, self.loss_fn)
        else:
            with self.autocast():
                pred = self.engine.model(x, static, self.res_km)
            loss = self.loss_fn(pred, y, mask)
        stop_now, bad = _all_max([float(self.stop.requested(self.step)),
                                  float(not torch.isfinite(loss))], self.device)
        if bad:
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.step}; the last good "
                f"resumable state in {self.state_dir} is kept. Lower train.lr, "
                "set train.precision: fp32, or check the input tiles")
        if stop_now:
            self.save_state()
            raise TrainingInterrupted(
                f"stopped by a signal at step {self.step}; resumable state saved in "
                f"{self.state_dir}; run again to continue (exit {EXIT_REQUEUE})")
        norm = self.engine.step(loss)
        self.scheduler.step()
        self.step += 1
        return loss.detach(), norm

    def run(self) -> dict:
        self.try_resume()
        if self.rank == 0:
            self.metrics = MetricsLog(self.metrics_path, self.resumed_from)
        log.info("training %d steps (%d per epoch, global batch %d, dp %d, world %d, %s, "
                 "autocast %s)", self.total_steps, self.steps_per_epoch, self.opts.batch_size,
                 self.engine.dp_size, self.world, self.device, self.autocast_dtype)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   mininterval=2, disable=self.rank != 0)
        stopped_early, out_of_time, running, norms = False, False, [], []
        window_start, window_steps = time.perf_counter(), 0
        p = self.model_config["patch_size"]
        try:
            while self.step < self.total_steps and not (stopped_early or out_of_time):
                epoch, batch_in_epoch = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_position(epoch, batch_in_epoch)
                for batch in self.loader:
                    loss, norm = self.train_step(batch)
                    window_steps += 1
                    running.append(float(loss))
                    if norm is not None:
                        norms.append(float(norm))
                    bar.update()
                    epoch_no = math.ceil(self.step / self.steps_per_epoch)
                    if self.step % self.log_every == 0:
                        elapsed = time.perf_counter() - window_start
                        rate = window_steps * self.opts.batch_size / max(elapsed, 1e-9)
                        mean = _all_sum([sum(running), len(running)], self.device)
                        tokens = (batch[0].shape[-2] // p) * (batch[0].shape[-1] // p)
                        row = {"step": self.step, "epoch": epoch_no,
                               "train_loss": mean[0] / max(mean[1], 1),
                               "lr": self.scheduler.get_last_lr()[0],
                               "samples_per_s": round(rate, 3),
                               "tokens_per_s": round(rate * tokens, 1),
                               "memory_mb": round(memory_mb(self.device), 1),
                               "grad_norm": norms[-1] if norms else ""}
                        self.write_row(row)
                        bar.set_postfix(loss=f"{row['train_loss']:.4f}")
                        running, norms = [], []
                        window_start, window_steps = time.perf_counter(), 0
                    # every rank agrees on the time budget (one rank's clock decides for all)
                    if self.opts.max_minutes:
                        out_of_time = bool(_all_max([float(self.out_of_time())], self.device)[0])
                    last = self.step == self.total_steps or out_of_time
                    validated = False
                    if self.step % self.val_every == 0 or last:
                        stopped_early = self.validation(epoch_no, bar, last)
                        validated = True
                    if (self.opts.checkpoint_every_steps and not validated
                            and self.step % self.opts.checkpoint_every_steps == 0):
                        self.save_state()
                    if stopped_early or last:
                        break
            if out_of_time:
                log.info("train.max_minutes=%s spent at step %d of %d", self.opts.max_minutes,
                         self.step, self.total_steps)
            note = self.convergence_note(stopped_early)
            if note:
                self.write_row({"step": self.step, "note": note})
            self.save_state(finished=True)
        finally:
            _shutdown_workers(self.loader)
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        if self.rank == 0:
            self.publish()
        if dist.is_initialized():
            dist.barrier()
        return {"best_step": self.best_step,
                "best_epoch": math.ceil(self.best_step / self.steps_per_epoch),
                "best_val_loss": self.best_val, "steps": self.step,
                "resumed_from": self.resumed_from, "stopped_early": stopped_early,
                "out_of_time": out_of_time, "converged": note is None,
                "world_size": self.world,
                "init_from": None if self.init_report is None else {
                    k: len(v) for k, v in self.init_report.items()}}

    def convergence_note(self, stopped_early: bool) -> str | None:
        """A warning when training ended while the val loss was still falling steeply."""
        if stopped_early or len(self.val_history) < 3:
            return None
        (_, a), (_, _), (_, c) = self.val_history[-3:]
        rate = (a - c) / (2 * max(abs(c), 1e-12))  # relative fall per validation
        if rate <= STILL_FALLING:
            return None
        note = (f"not converged: the val loss still fell {100 * rate:.1f}% per validation over "
                "the last three; train longer (train.epochs, train.max_steps, train.max_minutes)")
        log.warning("WARNING: %s", note)
        return note

    def write_row(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(row)

    def validation(self, epoch_no: int, bar, last: bool = False) -> bool:
        """Validate, keep the best weights, save the resumable state; True to stop early."""
        val_loss = self.validate()
        self.val_history.append((self.step, val_loss))
        self.write_row({"step": self.step, "epoch": epoch_no, "val_loss": val_loss,
                        "lr": self.scheduler.get_last_lr()[0]})
        if self.rank == 0:
            bar.write(f"step {self.step} (epoch {epoch_no}): val loss {val_loss:.4f}")
        log.info("step %d: val loss %.6f", self.step, val_loss)
        if val_loss < self.best_val * (1 - self.opts.min_delta):
            self.best_val, self.best_step, self.bad_validations = val_loss, self.step, 0
            self.save_best(val_loss)
        else:
            self.bad_validations += 1
        patience = self.opts.patience
        stop = bool(patience) and self.bad_validations >= patience
        if stop:
            log.info("early stopping: %d validations without improvement", patience)
        if not stop and not last:
            self.save_state()
        return stop

    def publish(self) -> None:
        """Copy the best checkpoint and the metrics to the rule's outputs, atomically."""
        if not self.best_path.is_file():
            raise RuntimeError(f"no best checkpoint in {self.state_dir}; training ran no "
                               "validation (check train.epochs and train.val_every_steps)")
        for source, target in ((self.best_path, self.checkpoint_path),
                               (self.metrics_path, self.log_path)):
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
