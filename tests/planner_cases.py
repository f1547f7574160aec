"""Measured peak memory of small CPU training steps, for tests/test_planner.py (module level so
``launcher.spawn`` can pickle it).

The measure is torch's ``MemTracker`` (a dispatch mode that follows every tensor storage:
parameters, gradients, optimizer states, activations, temporaries) over one training step after
a warm-up step, so the AdamW moments exist and are counted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from downscaler.model.presets import build_model
from torch.distributed._tools.mem_tracker import MemTracker

MODEL = {"embed_dim": 64, "depth": 4, "num_heads": 4}
VARS = (["a", "b", "c", "d"], ["a", "b"], ["s0", "s1"])


def measured_peak(rank: int, world: int, layout: dict, coarse: int, batch: int,
                  activation_checkpointing: bool) -> int:
    """Peak bytes of one training step of the tiny model under ``layout`` on this rank."""
    from downscaler.parallel import Layout, build_mesh, parallelize, reduce_gradients

    torch.manual_seed(0)
    model = build_model("tiny", *VARS, **MODEL)
    lay = Layout.from_config(layout)
    mesh = build_mesh(lay) if world > 1 else None
    model = parallelize(model, lay, mesh, activation_checkpointing)
    pipe = None
    if lay.pp > 1:  # the engine's driver, one micro-batch (MemTracker follows a module once
        # per step); the estimate counts the whole per-rank batch alive, as here
        from downscaler.parallel.pipeline import Pipeline

        pipe = Pipeline(model, mesh["pp"].get_local_rank(), lay.pp, torch.device("cpu"),
                        mesh["pp"].get_group(), "gpipe", 1)
    opt = torch.optim.AdamW(model.parameters())
    g = torch.Generator().manual_seed(1)
    fine = 4 * coarse
    x = torch.randn(batch, 4, coarse, coarse, generator=g)
    static = torch.randn(batch, 2, fine, fine, generator=g)
    y = torch.randn(batch, 2, fine, fine, generator=g)

    def step() -> None:
        if pipe is None:
            F.mse_loss(model(x, static, 25.0), y).backward()
        else:
            pipe.forward_backward(x, static, y, None, 25.0, lambda p, t, _: F.mse_loss(p, t))
        if mesh is not None:
            reduce_gradients(model, lay, mesh)
        opt.step()
        opt.zero_grad()

    step()  # warm-up: creates the optimizer states
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        step()
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(v["Total"] for v in peak.values()))
