"""Single-process training of Reslim on TILES patches.

AdamW (betas 0.9/0.99, as ORBIT-2), linear warm-up then cosine decay per step, the TV-regularised
loss with per-variable weights, validation after every epoch, and the weights with the best
validation loss kept as the checkpoint. The loss curve goes to a CSV as training runs.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from downscaler.checkpoint import save_checkpoint
from downscaler.model.loss import tv_regularised_loss
from downscaler.model.presets import build_model
from downscaler.tiles_store import TileDataset
from downscaler.variables import BY_SHORT_NAME

LOG_FIELDS = ["step", "epoch", "train_loss", "val_loss", "lr"]


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


@torch.no_grad()
def evaluate_loss(model, loader, res_km, loss_fn) -> float:
    model.eval()
    total, count = 0.0, 0
    for x, static, y in loader:
        total += float(loss_fn(model(x, static, res_km), y)) * len(x)
        count += len(x)
    model.train()
    return total / max(count, 1)


def train(config: dict, train_path: str, val_path: str, checkpoint_path: str,
          log_path: str) -> dict:
    """Train from the tile stores; write the checkpoint and the loss CSV. Returns a summary."""
    seed, opts = config["seed"], config["train"]
    torch.manual_seed(seed)
    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    train_set, val_set = TileDataset(train_path), TileDataset(val_path)
    attrs = train_set.attrs
    variables, statics, res_km = attrs["variables"], attrs["statics"], attrs["res_km"]
    overrides = {k: v for k, v in config["model"].items() if k != "preset"}
    model = build_model(config["model"]["preset"], variables, variables, statics,
                        mag=attrs["factor"], **overrides)

    loader = DataLoader(train_set, batch_size=opts["batch_size"], shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val_set, batch_size=opts["batch_size"])
    weights = variable_weights(config, variables)

    def loss_fn(pred, target):
        return tv_regularised_loss(pred, target, var_weights=weights, tv_weight=opts["tv_weight"])

    optimizer = torch.optim.AdamW(model.parameters(), lr=opts["lr"], betas=(0.9, 0.99),
                                  weight_decay=opts["weight_decay"])
    total_steps = opts["epochs"] * len(loader)
    warmup_steps = max(1, round(opts["warmup_epochs"] * len(loader)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, total_steps))

    log_every = max(1, len(loader) // 5)
    best = {"val_loss": math.inf, "state": None, "epoch": 0}
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", newline="") as log_file:
        log = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
        log.writeheader()
        step, running = 0, []
        bar = tqdm(total=total_steps, desc="train", unit="step", mininterval=2)
        for epoch in range(1, opts["epochs"] + 1):
            for x, static, y in loader:
                loss = loss_fn(model(x, static, res_km), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {step}; "
                                             "lower train.lr or check the input data")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                running.append(loss.item())
                bar.update()
                if step % log_every == 0:
                    lr = scheduler.get_last_lr()[0]
                    log.writerow({"step": step, "epoch": epoch, "train_loss": _mean(running),
                                  "val_loss": "", "lr": lr})
                    bar.set_postfix(loss=f"{_mean(running):.4f}")
                    running = []
            val_loss = evaluate_loss(model, val_loader, res_km, loss_fn)
            log.writerow({"step": step, "epoch": epoch, "train_loss": "", "val_loss": val_loss,
                          "lr": scheduler.get_last_lr()[0]})
            log_file.flush()
            bar.write(f"epoch {epoch}: val loss {val_loss:.4f}")
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "state": copy.deepcopy(model.state_dict()),
                        "epoch": epoch}
        bar.close()

    model.load_state_dict(best["state"])
    tiling = {k: attrs[k] for k in ("div_lat", "div_lon", "halo", "pad_mode", "factor")}
    save_checkpoint(checkpoint_path, model, variables=variables, statics=statics,
                    stats=attrs["stats"], tiling=tiling, res_km=res_km, config=config,
                    epoch=best["epoch"], step=step, val_loss=best["val_loss"])
    return {"best_epoch": best["epoch"], "best_val_loss": best["val_loss"], "steps": step}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
