"""The training engine: Reslim on TILES patches, on one process or many (DDP/FSDP/TP/SP/DeepSpeed).

ORBIT-2's recipe (AdamW betas 0.9/0.99, linear warm-up then cosine decay per step, the
TV-regularised loss with per-variable weights) plus what a real cluster needs: a distributed,
resumable sampler (the same global batches for any data-parallel size), validation every N steps
with early stopping, gradient clipping, bf16 autocast where the device has it, atomic resumable
checkpoints (exact step, data order, optimizer, scheduler and RNG state), a save-and-exit on
SIGTERM/SIGUSR1 (Slurm's warning before the time limit), a clear stop on NaN/inf, and metrics
(CSV, TensorBoard when installed, a progress bar on rank 0, one log file per rank).

``train(config, train_path, val_path, checkpoint_path, log_path)`` is what the CLI calls; the
launcher turns it into one call per rank. The resumable state lives in
``<checkpoint dir>/train_state/``; the best weights are written as a consolidated checkpoint
(``checkpoint_path``, read by ``checkpoint.load_checkpoint``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from downscaler import checkpoint as ckpt
from downscaler.io import atomic_path
from downscaler.launcher import EXIT_REQUEUE, TrainingInterrupted, launch, resolve_device
from downscaler.model.loss import tv_regularised_loss
from downscaler.model.presets import build_model
from downscaler.tiles_store import TileDataset
from downscaler.variables import BY_SHORT_NAME

# The figures read the first five columns; the rest are throughput and memory of rank 0.
LOG_FIELDS = ["step", "epoch", "train_loss", "val_loss", "lr", "samples_per_s", "tokens_per_s",
              "memory_mb"]
STATE_DIR_NAME = "train_state"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# Config keys that do not change the numbers, so a resume may differ in them.
_NON_NUMERIC_KEYS = {"parallel": None, "train": ("workers", "threads", "log_dir", "resume")}

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


class ResumableSampler(Sampler[int]):
    """This data-parallel rank's indices: global batches from a per-epoch permutation.

    The permutation depends only on (seed, epoch); global batch k is ``perm[k*B:(k+1)*B]`` and
    rank r takes its contiguous slice of ``B/dp`` samples (the slice ``parallel.shard_batch``
    would take), so every dp size sees the same global batches. ``set_position(epoch, batch)``
    makes the next iteration start after the batches already trained on (mid-epoch resume).
    The last incomplete global batch is dropped so every step has the same size.
    """

    def __init__(self, n: int, global_batch: int, dp_rank: int, dp_size: int, seed: int):
        if global_batch % dp_size:
            raise ValueError(f"config key train.batch_size={global_batch} must be divisible by "
                             f"the data-parallel degree {dp_size} (dp_replicate * dp_shard)")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.dp_rank, self.local_batch = dp_rank, global_batch // dp_size
        self.batches = n // global_batch
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        for k in range(self.start_batch, self.batches):
            start = k * self.global_batch + self.dp_rank * self.local_batch
            yield from perm[start:start + self.local_batch]

    def __len__(self) -> int:
        return (self.batches - self.start_batch) * self.local_batch


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


def resolve_layout(par: dict, world_size: int) -> dict:
    """The parallel sizes with ``dp_replicate: 0`` (auto) filled in from the world size."""
    sizes = {k: par.get(k, 1) for k in ("dp_replicate", "dp_shard", "tp", "sp")}
    rest = sizes["dp_shard"] * sizes["tp"] * sizes["sp"]
    if sizes["dp_replicate"] == 0:
        if world_size % rest:
            raise ValueError(
                f"config keys parallel.dp_shard*tp*sp = {rest} do not divide the {world_size} "
                "processes; change them or parallel.processes / the srun task count")
        sizes["dp_replicate"] = world_size // rest
    return {**sizes, "dchag": par.get("dchag")}


def train(config: dict, train_path: str, val_path: str, checkpoint_path: str,
          log_path: str) -> dict:
    """Train from the tile stores; write the best checkpoint and the metrics CSV.

    Runs on every rank of the launcher's world (srun tasks, torchrun, or
    ``parallel.processes`` local processes). Returns rank 0's summary; raises
    ``TrainingInterrupted`` (exit status 75) after saving on SIGTERM/SIGUSR1.
    """
    par = config.get("parallel", {})
    device = resolve_device(par.get("device", "auto"))
    # DeepSpeed needs a process group even on one process
    group = par.get("engine", "torch") == "deepspeed"
    return launch(_run, par.get("processes", 1), device, config, train_path, val_path,
                  checkpoint_path, log_path, always_group=group)


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

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _setup_logging(log_dir: str, rank: int) -> logging.Handler:
    """One log file per rank; rank 0 also logs to stderr (the rule's log)."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(log_dir) / f"rank{rank}.log", mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s rank" + str(rank) + " %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    if rank == 0:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        handler.stream_handler = stream  # type: ignore[attr-defined]
        log.addHandler(stream)
    return handler


def _teardown_logging(handler: logging.Handler) -> None:
    for h in (handler, getattr(handler, "stream_handler", None)):
        if h is not None:
            log.removeHandler(h)
            h.close()


def _precision(requested: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where asked (or 'auto' on a GPU that supports it), else None."""
    if requested == "bf16":
        return torch.bfloat16
    if requested == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def _memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: GPU allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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


class _Parallel:
    """The model as trained: plain, DDP/FSDP/TP/SP through downscaler.parallel, or DeepSpeed."""

    def __init__(self, base: nn.Module, config: dict, device: torch.device, world: int):
        par, opts = config.get("parallel", {}), config["train"]
        self.base, self.engine_kind = base, par.get("engine", "torch")
        self.layout = self.mesh = self.ds_engine = None
        self.tp_group = None  # set for D-CHAG, whose gradient norm needs it
        self.dp_rank, self.dp_size = (dist.get_rank(), world) if world > 1 else (0, 1)
        sizes = resolve_layout(par, world)
        needed = math.prod(sizes[k] for k in ("dp_replicate", "dp_shard", "tp", "sp"))
        if needed != world:
            raise ValueError(
                f"config keys parallel.dp_replicate*dp_shard*tp*sp = {needed} but {world} "
                "process(es) run; set parallel.processes (local) or the srun task count to "
                f"{needed}, or set parallel.dp_replicate: 0 to fill the rest automatically")
        if sizes.get("dchag") and world == 1:
            raise ValueError(
                f"config key parallel.dchag={sizes['dchag']!r} splits the channels over the "
                "tensor-parallel group and needs parallel.tp >= 2 processes; set parallel.tp "
                "and parallel.processes (or the srun task count), or set parallel.dchag: null")
        if self.engine_kind == "deepspeed":
            self._init_deepspeed(config, device, world, sizes)
            return
        if self.engine_kind != "torch":
            raise ValueError(f"config key parallel.engine: {self.engine_kind!r} is not 'torch' "
                             "or 'deepspeed'")
        base.to(device)
        self.model: nn.Module = base
        if world > 1:
            try:
                from downscaler.parallel import Layout, build_mesh, parallelize
            except ImportError as err:
                raise ImportError(f"parallel training needs downscaler.parallel ({err}); "
                                  "reinstall the package") from err
            self.layout = Layout.from_config(sizes)
            self.layout.validate(world, base.cfg)
            self.mesh = build_mesh(self.layout, device.type)
            self.model = parallelize(base, self.layout, self.mesh,
                                     activation_checkpointing=par.get(
                                         "activation_checkpointing", False))
            self.dp_size = self.layout.dp
            if self.layout.dchag is not None:
                self.tp_group = self.mesh["tp"].get_group()
            self.dp_rank = (self.mesh["dp_replicate"].get_local_rank() * self.layout.dp_shard
                            + self.mesh["dp_shard"].get_local_rank())
        elif par.get("activation_checkpointing", False):
            from downscaler.model.checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(base)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opts["lr"],
                                           betas=(0.9, 0.99), weight_decay=opts["weight_decay"])

    def _init_deepspeed(self, config: dict, device: torch.device, world: int,
                        sizes: dict) -> None:
        if any(sizes[k] != 1 for k in ("dp_shard", "tp", "sp")):
            raise ValueError(
                "config key parallel.engine is 'deepspeed', which shards with ZeRO "
                "(parallel.zero_stage) over plain data parallelism; set parallel.dp_shard, tp "
                "and sp to 1, or use engine: torch for FSDP/TP/SP layouts")
        try:
            from downscaler.parallel.deepspeed_engine import build_deepspeed_engine
        except ImportError as err:
            raise ImportError(
                f"config key parallel.engine is 'deepspeed' but it cannot be loaded ({err}); "
                "pip install deepspeed, or set parallel.engine: torch") from err
        opts = config["train"]
        bf16 = _precision(opts.get("precision", "auto"), device) is not None
        section = {"zero_stage": config.get("parallel", {}).get("zero_stage", 1),
                   "lr": opts["lr"], "weight_decay": opts["weight_decay"], "betas": [0.9, 0.99],
                   "grad_clip": opts.get("grad_clip", 0.0), "bf16": bf16,
                   "micro_batch_size": opts["batch_size"] // world}
        self.ds_engine = build_deepspeed_engine(self.base, section)
        self.model = self.ds_engine
        self.optimizer = self.ds_engine.optimizer

    def parameters(self):
        return self.model.parameters()

    def backward_step(self, loss: torch.Tensor, clip: float) -> None:
        if self.ds_engine is not None:  # DeepSpeed clips (gradient_clipping) inside step()
            self.ds_engine.backward(loss)
            self.ds_engine.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.layout is not None:
            from downscaler.parallel import reduce_gradients

            reduce_gradients(self.model, self.layout, self.mesh)
        if clip > 0 and self.tp_group is not None:
            _clip_dchag_grad_norm(self.model, clip, self.tp_group)
        elif clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()

    def save_state(self, state_dir: Path, meta: dict, rank_state: dict) -> Path:
        engine_save = None
        if self.ds_engine is not None:
            from downscaler.parallel.deepspeed_engine import save_checkpoint as ds_save

            def engine_save(path: Path) -> None:
                ds_save(self.ds_engine, str(path))
        return ckpt.save_train_state(state_dir, self.model, self.optimizer, meta, rank_state,
                                     engine_save=engine_save)

    def load_state(self, path: Path) -> tuple[dict, dict | None]:
        engine_load = None
        if self.ds_engine is not None:
            from downscaler.parallel.deepspeed_engine import load_checkpoint as ds_load

            def engine_load(p: Path) -> None:
                ds_load(self.ds_engine, str(p))
        return ckpt.load_train_state(path, self.model, self.optimizer, engine_load=engine_load)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Consolidated weights on rank 0 (collective)."""
        if self.ds_engine is not None:
            return _deepspeed_full_state(self.ds_engine)
        return ckpt.full_model_state(self.model)

    def dchag(self) -> dict | None:
        """``{"variant", "tp"}`` when the model trains with D-CHAG (stored in the checkpoint,
        so inference rebuilds the single-process D-CHAG model), else None."""
        if self.ds_engine is not None:
            return None
        return ckpt.dchag_metadata(self.model)


@torch.no_grad()
def _clip_dchag_grad_norm(model: nn.Module, max_norm: float, tp_group: Any) -> float:
    """``clip_grad_norm_`` for a D-CHAG model: clips by, and returns, the norm of the whole
    (reference) model's gradient.

    torch's version cannot mix D-CHAG's plain per-rank tensors with DTensors, and would count
    each rank's private gradients alone: here those are summed over the TP group, and every
    other gradient (replicated, or a DTensor whose norm covers all its shards) is counted once.
    """
    from torch.distributed.tensor import DTensor

    from downscaler.parallel.dchag import is_tp_distinct

    inner = getattr(model, "module", model)
    shared = torch.zeros((), dtype=torch.float64)
    distinct = torch.zeros((), dtype=torch.float64)
    grads = []
    for name, p in inner.named_parameters():
        if p.grad is None:
            continue
        grads.append(p.grad)
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32) ** 2
        if isinstance(sq, DTensor):  # reduced over the parameter's own mesh
            sq = sq.full_tensor()
        if is_tp_distinct(name):
            distinct += sq.double().cpu()
        else:
            shared += sq.double().cpu()
    device = grads[0].device if grads else torch.device("cpu")
    distinct = distinct.to(device)
    dist.all_reduce(distinct, group=tp_group)
    total = float((shared.to(device) + distinct).sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def _deepspeed_full_state(engine: Any) -> dict[str, torch.Tensor]:
    """Full weights of a DeepSpeed engine on rank 0 (ZeRO-3 parameters gathered first)."""
    from downscaler.parallel.deepspeed_engine import full_state_dict

    state = full_state_dict(engine)  # collective
    rank = dist.get_rank() if dist.is_initialized() else 0
    return state if rank == 0 else {}


class _ManualLR:
    """Warm-up + cosine set on the param groups directly (DeepSpeed's optimizer wrappers are not
    torch Optimizers, so LambdaLR cannot drive them); same interface as LambdaLR here."""

    def __init__(self, optimizer: Any, base_lr: float, factor) -> None:
        self.optimizer, self.base_lr, self.factor, self.last_epoch = optimizer, base_lr, factor, 0
        self._apply()

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.base_lr * self.factor(self.last_epoch)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [self.base_lr * self.factor(self.last_epoch)]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = state["last_epoch"]
        self._apply()


def _run(device: torch.device, config: dict, train_path: str, val_path: str,
         checkpoint_path: str, log_path: str) -> dict:
    """The loop on one rank (called by the launcher inside the process group)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    seed, opts, par = config["seed"], config["train"], config.get("parallel", {})
    handler = _setup_logging(opts.get("log_dir", "logs/train"), rank)
    try:
        threads = opts.get("threads", 0)
        if not threads and world > 1 and device.type == "cpu":  # ranks share the cores
            threads = max(1, (os.cpu_count() or 1) // world)
        if threads:
            torch.set_num_threads(threads)
        with _StopFlag() as stop:
            return _Loop(device, config, train_path, val_path, checkpoint_path, log_path, rank,
                         world, seed, opts, par, stop).run()
    finally:
        _teardown_logging(handler)


class _Loop:
    """State and steps of one training run on one rank."""

    def __init__(self, device, config, train_path, val_path, checkpoint_path, log_path, rank,
                 world, seed, opts, par, stop) -> None:
        self.device, self.config, self.rank, self.world = device, config, rank, world
        self.opts, self.stop, self.seed = opts, stop, seed
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

        torch.manual_seed(seed)  # every rank builds identical initial weights
        overrides = {k: v for k, v in config["model"].items() if k != "preset"}
        base = build_model(config["model"]["preset"], self.variables, self.variables,
                           self.statics, mag=attrs["factor"], **overrides)
        self.model_config = dataclasses.asdict(base.cfg)
        self.init_report = None
        if opts.get("init_from"):
            self.init_report = ckpt.load_matching_weights(base, opts["init_from"])
            log.info("init_from %s: loaded %d tensors, skipped %d mismatched %s, %d new %s",
                     opts["init_from"], len(self.init_report["loaded"]),
                     len(self.init_report["skipped"]), self.init_report["skipped"],
                     len(self.init_report["new"]), self.init_report["new"])
        self.par = _Parallel(base, config, device, world)

        batch = opts["batch_size"]
        self.sampler = ResumableSampler(len(self.train_set), batch, self.par.dp_rank,
                                        self.par.dp_size, seed)
        self.steps_per_epoch = self.sampler.batches
        if self.steps_per_epoch == 0:
            raise ValueError(f"config key train.batch_size={batch} is larger than the "
                             f"{len(self.train_set)} training tiles; lower it")
        workers = opts.get("workers", 0)
        pin = device.type == "cuda"
        self.loader = DataLoader(self.train_set, batch_size=self.sampler.local_batch,
                                 sampler=self.sampler, num_workers=workers, pin_memory=pin,
                                 persistent_workers=workers > 0,
                                 worker_init_fn=_ignore_stop_signals if workers else None)
        val_idx = list(range(len(self.val_set)))[self.par.dp_rank::self.par.dp_size]
        self.val_loader = DataLoader(torch.utils.data.Subset(self.val_set, val_idx),
                                     batch_size=self.sampler.local_batch, num_workers=0,
                                     pin_memory=pin)
        self.total_steps = opts["epochs"] * self.steps_per_epoch
        warmup = max(1, round(opts["warmup_epochs"] * self.steps_per_epoch))
        def factor(s: int) -> float:
            return warmup_cosine(s, warmup, self.total_steps)

        self.scheduler = (_ManualLR(self.par.optimizer, opts["lr"], factor)
                          if self.par.ds_engine is not None
                          else torch.optim.lr_scheduler.LambdaLR(self.par.optimizer, factor))
        self.val_every = opts.get("val_every_steps", 0) or self.steps_per_epoch
        self.log_every = opts.get("log_every_steps", 0) or max(1, self.steps_per_epoch // 5)
        self.ckpt_every = opts.get("checkpoint_every_steps", 0)
        # DeepSpeed casts the model itself (its bf16 section), so no autocast around it
        self.autocast_dtype = (None if self.par.ds_engine is not None
                               else _precision(opts.get("precision", "auto"), device))
        self.weights = variable_weights(config, self.variables).to(device)
        self.fingerprint = config_fingerprint(config)
        self.step, self.best_val, self.best_step, self.bad_validations = 0, math.inf, 0, 0
        self.resumed_from = None
        self.metrics_path = self.state_dir / "metrics.csv"
        self.best_path = self.state_dir / "best.pt"
        self.tensorboard = None

    # -- pieces ---------------------------------------------------------------------------
    def loss_fn(self, pred: torch.Tensor, target: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        return tv_regularised_loss(pred.float(), target, var_weights=self.weights,
                                   tv_weight=self.opts["tv_weight"], mask=mask)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(self.device, non_blocking=True) for t in tensors]

    @torch.no_grad()
    def validate(self) -> float:
        self.par.model.eval()
        total, count = 0.0, 0
        for batch in self.val_loader:
            x, static, y, mask = self.to_device(*batch)
            with self.autocast():
                pred = self.par.model(x, static, self.res_km)
            total += float(self.loss_fn(pred, y, mask)) * len(x)
            count += len(x)
        self.par.model.train()
        # tp/sp ranks repeat their dp rank's sums, which scales both sums alike
        total, count = _all_sum([total, count], self.device)
        return total / max(count, 1)

    def meta(self, finished: bool = False) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(),
                "best_val": self.best_val, "best_step": self.best_step,
                "bad_validations": self.bad_validations, "fingerprint": self.fingerprint,
                "dp_size": self.par.dp_size, "world_size": self.world, "finished": finished,
                "engine": self.par.engine_kind}

    def rank_state(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def save_state(self, finished: bool = False) -> None:
        t0 = time.perf_counter()
        path = self.par.save_state(self.state_dir, self.meta(finished), self.rank_state())
        log.info("saved resumable state at step %d to %s (%.1f s)", self.step, path,
                 time.perf_counter() - t0)

    def try_resume(self) -> None:
        """Continue from the committed state if it belongs to this config and is unfinished."""
        if not self.opts.get("resume", True):
            return
        path = ckpt.find_train_state(self.state_dir)
        if path is None:
            return
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=False)
        why = None
        if meta.get("fingerprint") != self.fingerprint:
            why = "it was written with a different config"
        elif meta.get("finished"):
            why = "that run had finished"
        elif meta.get("engine") != self.par.engine_kind:
            why = f"it was written by the {meta.get('engine')} engine"
        if why:
            log.info("not resuming from %s: %s; starting afresh", path, why)
            return
        meta, rank_state = self.par.load_state(path)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.best_val = meta["step"], meta["best_val"]
        self.best_step, self.bad_validations = meta["best_step"], meta["bad_validations"]
        if rank_state is not None and meta["world_size"] == self.world:
            torch.set_rng_state(rank_state["torch"])
            if "cuda" in rank_state and self.device.type == "cuda":
                torch.cuda.set_rng_state(rank_state["cuda"], self.device)
        if meta["dp_size"] != self.par.dp_size:
            log.info("data-parallel size changed (%d -> %d): global batches stay the same, "
                     "RNG streams restart", meta["dp_size"], self.par.dp_size)
        self.resumed_from = self.step
        log.info("resumed from %s at step %d of %d", path, self.step, self.total_steps)

    def open_metrics(self):
        """The metrics CSV in the state dir; on resume, rows after the resumed step dropped."""
        rows = []
        if self.resumed_from is not None and self.metrics_path.is_file():
            with open(self.metrics_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= self.step]
        self.state_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.metrics_path, "w", newline="")
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in LOG_FIELDS} for r in rows)
        f.flush()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.state_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tensorboard = None
        return f, writer

    def write_row(self, f, writer, row: dict) -> None:
        writer.writerow({k: row.get(k, "") for k in LOG_FIELDS})
        f.flush()
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("step", "epoch") and value != "":
                    self.tensorboard.add_scalar(key, float(value), row["step"])

    def save_best(self, val_loss: float) -> None:
        state = self.par.full_state()  # collective
        if self.rank == 0:
            tiling = {k: self.attrs[k] for k in ("div_lat", "div_lon", "halo", "pad_mode",
                                                 "factor")}
            ckpt.write_checkpoint(
                self.best_path, self.model_config, state, variables=self.variables,
                statics=self.statics, stats=self.attrs["stats"], tiling=tiling,
                res_km=self.res_km, config=self.config,
                epoch=math.ceil(self.step / self.steps_per_epoch), step=self.step,
                val_loss=val_loss, dchag=self.par.dchag())

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict:
        self.try_resume()
        f = writer = None
        if self.rank == 0:
            f, writer = self.open_metrics()
        log.info("training %d steps (%d per epoch, global batch %d, dp %d, world %d, %s, "
                 "autocast %s)", self.total_steps, self.steps_per_epoch, self.opts["batch_size"],
                 self.par.dp_size, self.world, self.device, self.autocast_dtype)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                   mininterval=2, disable=self.rank != 0)
        stopped_early, running = False, []
        window_start, window_steps = time.perf_counter(), 0
        tokens_per_sample = None
        try:
            while self.step < self.total_steps and not stopped_early:
                epoch, batch_in_epoch = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_position(epoch, batch_in_epoch)
                for batch in self.loader:
                    x, static, y, mask = self.to_device(*batch)
                    if tokens_per_sample is None:
                        p = self.model_config["patch_size"]
                        tokens_per_sample = (x.shape[-2] // p) * (x.shape[-1] // p)
                    with self.autocast():
                        pred = self.par.model(x, static, self.res_km)
                    loss = self.loss_fn(pred, y, mask)
                    stop_now, bad = _all_max(
                        [float(self.stop.signum is not None), float(not torch.isfinite(loss))],
                        self.device)
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
                    self.par.backward_step(loss, self.opts.get("grad_clip", 0.0))
                    self.scheduler.step()
                    self.step += 1
                    window_steps += 1
                    running.append(loss.item())
                    bar.update()
                    epoch_no = math.ceil(self.step / self.steps_per_epoch)
                    if self.step % self.log_every == 0:
                        elapsed = time.perf_counter() - window_start
                        rate = window_steps * self.opts["batch_size"] / max(elapsed, 1e-9)
                        mean = _all_sum([sum(running), len(running)], self.device)
                        row = {"step": self.step, "epoch": epoch_no,
                               "train_loss": mean[0] / max(mean[1], 1),
                               "lr": self.scheduler.get_last_lr()[0],
                               "samples_per_s": round(rate, 3),
                               "tokens_per_s": round(rate * tokens_per_sample, 1),
                               "memory_mb": round(_memory_mb(self.device), 1)}
                        if self.rank == 0:
                            self.write_row(f, writer, row)
                        bar.set_postfix(loss=f"{row['train_loss']:.4f}")
                        running, window_start, window_steps = [], time.perf_counter(), 0
                    validated = False
                    if self.step % self.val_every == 0 or self.step == self.total_steps:
                        stopped_early = self.validation(f, writer, epoch_no, bar)
                        validated = True
                    if self.ckpt_every and self.step % self.ckpt_every == 0 and not validated:
                        self.save_state()
                    if stopped_early or self.step >= self.total_steps:
                        break
            self.save_state(finished=True)
        finally:
            _shutdown_workers(self.loader)
            bar.close()
            if f is not None:
                f.close()
                if self.tensorboard is not None:
                    self.tensorboard.close()
        if self.rank == 0:
            self.publish()
        if dist.is_initialized():
            dist.barrier()
        return {"best_step": self.best_step,
                "best_epoch": math.ceil(self.best_step / self.steps_per_epoch),
                "best_val_loss": self.best_val, "steps": self.step,
                "resumed_from": self.resumed_from, "stopped_early": stopped_early,
                "world_size": self.world,
                "init_from": None if self.init_report is None else {
                    k: len(v) for k, v in self.init_report.items()}}

    def validation(self, f, writer, epoch_no: int, bar) -> bool:
        """Validate, keep the best weights, save the resumable state; True to stop early."""
        val_loss = self.validate()
        if self.rank == 0:
            self.write_row(f, writer, {"step": self.step, "epoch": epoch_no,
                                       "val_loss": val_loss,
                                       "lr": self.scheduler.get_last_lr()[0]})
        if self.rank == 0:
            bar.write(f"step {self.step} (epoch {epoch_no}): val loss {val_loss:.4f}")
        log.info("step %d: val loss %.6f", self.step, val_loss)
        if val_loss < self.best_val:
            self.best_val, self.best_step, self.bad_validations = val_loss, self.step, 0
            self.save_best(val_loss)
        else:
            self.bad_validations += 1
        patience = self.opts.get("patience", 0)
        stop = bool(patience) and self.bad_validations >= patience
        if stop:
            log.info("early stopping: %d validations without improvement", patience)
        if not stop and self.step < self.total_steps:
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
