"""Layout planner: propose tp / sp (mode) / FSDP / pipeline stages / D-CHAG / activation
checkpointing for a model size, a sequence length, a world size and a memory budget per device,
with a reason and an estimated memory per rank.

The estimate is analytic (element counts of what training keeps alive, per rank):

- model states: parameters, gradients and the two AdamW moments (4 values per parameter, in the
  master dtype), block parameters divided by ``tp``, everything divided by ``dp_shard`` (FSDP2);
- activations saved for backward, per sample: the per-channel tokens of the tokenisation and
  aggregation (``C`` tokens per patch; divided over ``tp`` by D-CHAG), per transformer block its
  ``L/sp`` tokens (the tp-sharded parts divided by ``tp``; LSS adds the full K and V, Ulysses the
  all-to-all buffers), the head on all ``L`` tokens and the fine-grid convolutions. With
  activation checkpointing a block keeps only its input (one block is recomputed at a time);
- a transient of the largest single activation (its gradient during backward).

Attention goes through ``scaled_dot_product_attention``, so no ``L x L`` score matrix is counted
(flash / memory-efficient kernels; the CPU flash kernel too). With ``pp`` pipeline stages a rank
holds ``depth / pp`` blocks (their states and activations) and, conservatively, all the other
parameters and the larger of the first stage's (tokenisation, fine-grid branch) and the last
stage's (head) activations; under 1F1B with ``pp`` micro-batches (the default) the first stage
keeps the activations of the whole per-rank batch alive at its peak, as without a pipeline (an
upper bound with more micro-batches).

Search: every layout that fits the world size and the model (``Layout.validate``), with and
without activation checkpointing, is estimated; among those within the budget the one with the
least communication wins (a fixed cost order: DDP < FSDP < activation checkpointing < sequence
parallel < tensor parallel < pipeline, since TP all-reduces twice per block in forward and
backward and a pipeline idles (pp-1)/(micro-batches+pp-1) of each step in its bubble), so pp is
proposed when the model does not fit otherwise (for instance when the heads do not split over
tp, the tokens not over sp, and the global batch not over more data-parallel ranks).

The engine asks ``plan_layout`` for the layout at start-up under ``parallel.layout: auto``
(``parallel.engine.planned_layout``); the CLI gives the same answer ahead of a run::

    python -m downscaler.parallel.planner --preset 1B --world 64 --memory-gib 64 \\
        --coarse-pixels 360x720 --tiles 16
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

import torch

from ..model.presets import PRESETS, build_model
from ..model.reslim import ReslimConfig
from .layout import Layout, LayoutError

__all__ = ["Plan", "ModelSize", "device_memory_bytes", "estimate_memory", "main", "plan_layout",
           "tokens_per_tile"]

GIB = 1024**3


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs of a model: its config and parameter counts by part."""

    cfg: ReslimConfig
    block_params: int  # inside the transformer blocks (tensor-parallel sharded)
    other_params: int  # everything else (replicated over tp unless D-CHAG)
    channel_params: int  # tokenizer + aggregator (split over tp by D-CHAG)

    @classmethod
    def from_preset(cls, preset: str, n_in: int = 4, n_out: int = 2, n_static: int = 2,
                    **overrides: Any) -> ModelSize:
        """Count the parameters of ``preset`` built on the meta device (no memory used)."""
        names = [f"v{i}" for i in range(max(n_in, n_out))]
        with torch.device("meta"):
            model = build_model(preset, names[:n_in], names[:n_out],
                                [f"s{i}" for i in range(n_static)], **overrides)
        return cls.from_model(model)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelSize:
        """Count the parameters of a built (not yet parallelized) Reslim."""
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        blocks = count(model.blocks)
        channel = count(model.tokenizer) + count(model.aggregator)
        return cls(model.cfg, blocks, count(model) - blocks, channel)


def tokens_per_tile(coarse_h: int, coarse_w: int, patch: int) -> int:
    """Transformer tokens of one tile: coarse pixels / patch^2 (each side must divide)."""
    if coarse_h % patch or coarse_w % patch:
        raise ValueError(f"a {coarse_h}x{coarse_w} coarse tile does not split into {patch}x"
                         f"{patch} patches; choose a tile whose sides divide by {patch}")
    return (coarse_h // patch) * (coarse_w // patch)


def estimate_memory(size: ModelSize, tokens: int, layout: Layout, batch: int = 1,
                    activation_checkpointing: bool = False, act_bytes: int = 4,
                    state_bytes: int = 4) -> dict[str, float]:
    """Estimated bytes per rank, by part, for a training step of ``batch`` samples per
    data-parallel rank of ``tokens`` tokens each (see the module doc for the model)."""
    cfg = size.cfg
    d, p, mag = cfg.embed_dim, cfg.patch_size, cfg.mag
    hidden = int(round(d * cfg.mlp_ratio))
    tp, sp = layout.tp, layout.sp
    n_ch = len(cfg.in_vars) + len(cfg.static_vars)
    n_out, n_st, rc = len(cfg.out_vars), len(cfg.static_vars), cfg.residual_channels
    # model states: parameter + gradient + 2 AdamW moments
    channel = size.channel_params / tp if layout.dchag else size.channel_params
    params = (size.block_params / tp / layout.pp + (size.other_params - size.channel_params)
              + channel)
    states = 4 * params * state_bytes / layout.dp_shard
    # activations, elements per sample
    tl = tokens / sp  # tokens of this rank inside the blocks
    if layout.dchag:  # C/tp channel tokens + reducer, tp gathered partial tokens, final kv
        channel_act = (n_ch / tp * 2 + 3 * tp + 4) * tokens * d
    else:  # channel tokens, the aggregator's k and v, its output
        channel_act = (3 * n_ch + 4) * tokens * d
    block = tl * (6 * d + 5 * d / tp + 2 * hidden / tp)  # norms, qkv, attn, proj, fc1, gelu
    if sp > 1:
        block += (2 * tokens * d / tp if layout.sp_mode == "lss"  # the gathered K and V
                  else 4 * tl * d / tp)  # the all-to-all results of q, k, v and the output
    depth = cfg.depth // layout.pp  # the blocks of one pipeline stage
    blocks = depth * (tl * d if activation_checkpointing else block)
    if activation_checkpointing:
        blocks += block  # the block being recomputed in backward
    fine = tokens * (p * mag) ** 2
    head = (2 * cfg.decoder_depth + 3) * tokens * d + 2 * n_out * fine
    fine_grid = fine * (2 * rc + 8 * n_out + n_st) + 2 * rc * tokens * p * p
    if layout.pp > 1:  # the first stage or the last, whichever holds more
        acts = batch * act_bytes * (blocks + max(channel_act + fine_grid, head))
    else:
        acts = batch * act_bytes * (channel_act + blocks + head + fine_grid)
    transient = batch * act_bytes * max(channel_act / 3, block, fine * rc)
    total = states + acts + transient
    return {"model_states": states, "activations": acts, "transient": transient, "total": total}


@dataclass(frozen=True)
class Plan:
    """A proposed layout, its estimated memory per rank and why it was chosen."""

    layout: Layout
    activation_checkpointing: bool
    memory: dict[str, float]
    reason: str

    def as_config(self) -> dict[str, Any]:
        """The ``parallel`` config keys of this plan."""
        lay = self.layout
        return {"dp_replicate": lay.dp_replicate, "dp_shard": lay.dp_shard, "tp": lay.tp,
                "sp": lay.sp, "sp_mode": lay.sp_mode, "dchag": lay.dchag,
                "activation_checkpointing": self.activation_checkpointing, "pp": lay.pp}


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _cost(layout: Layout, ac: bool) -> float:
    """Communication / recomputation cost order (lower is preferred)."""
    lg = math.log2
    return (1.0 * lg(layout.dp_shard) + 1.5 * ac + 2.0 * lg(layout.sp)
            + 0.25 * (layout.sp_mode == "lss" and layout.sp > 1) + 3.0 * lg(layout.tp)
            + 0.5 * (layout.dchag is not None) + 4.0 * lg(layout.pp))


def _candidates(size: ModelSize, world: int, tokens: int, dchag: bool,
                global_batch: int | None = None, pp_schedule: str = "1f1b") -> list[Layout]:
    out = []
    for pp, tp, sp, shard in product(_divisors(world), repeat=4):
        if world % (pp * tp * sp * shard) or tokens % sp:
            continue
        if pp > 1 and (sp > 1 or shard > 1):
            continue  # the pipeline composes with tp and plain data parallelism only
        if global_batch is not None:
            dp = world // (pp * tp * sp)
            if global_batch % dp:
                continue  # the sampler splits the global batch evenly over dp
            if pp > 1 and pp_schedule == "1f1b" and global_batch // dp < pp:
                continue  # 1F1B needs a micro-batch per stage
        for mode, dch in product(("ulysses", "lss"), (None, "linear")):
            if (sp == 1 and mode == "lss") or (dch and (not dchag or pp > 1)):
                continue
            layout = Layout(dp_replicate=world // (pp * tp * sp * shard), dp_shard=shard,
                            tp=tp, sp=sp, dchag=dch, sp_mode=mode, pp=pp)
            try:
                layout.validate(world, size.cfg)
            except LayoutError:
                continue
            out.append(layout)
    return out


def plan_layout(size: ModelSize, tokens: int, world: int, memory_bytes: float, batch: int = 1,
                act_bytes: int = 4, dchag: bool = False, state_bytes: int = 4,
                global_batch: int | None = None, pp_schedule: str = "1f1b") -> Plan:
    """The cheapest layout whose estimate fits ``memory_bytes`` per rank (``dchag`` allows
    D-CHAG, which changes the architecture; ``pp_schedule`` 1f1b needs a micro-batch per
    pipeline stage). ``batch`` is the samples per data-parallel rank;
    with ``global_batch`` it is ``global_batch / dp`` of each candidate instead (and candidates
    whose dp does not divide it are skipped). Raises ``ValueError`` naming the smallest estimate
    when nothing fits."""
    def per_rank(layout: Layout) -> int:
        return batch if global_batch is None else global_batch // layout.dp

    options = [(layout, ac, estimate_memory(size, tokens, layout, per_rank(layout), ac,
                                            act_bytes, state_bytes))
               for layout in _candidates(size, world, tokens, dchag, global_batch, pp_schedule)
               for ac in (False, True)]
    if not options:
        raise ValueError(f"no layout of {world} processes fits the model (heads "
                         f"{size.cfg.num_heads}), {tokens} tokens"
                         + (f" and a global batch of {global_batch}" if global_batch else "")
                         + "; change the world size")
    fits = [o for o in options if o[2]["total"] <= memory_bytes]
    if not fits:
        best = min(options, key=lambda o: o[2]["total"])
        raise ValueError(
            f"no layout of {world} processes fits {memory_bytes / GIB:.1f} GiB per rank: the "
            f"smallest estimate is {best[2]['total'] / GIB:.1f} GiB ({_describe(*best[:2])}); "
            "use more processes, fewer tokens per tile or a smaller model")
    layout, ac, memory = min(fits, key=lambda o: (_cost(o[0], o[1]), o[2]["total"]))
    return Plan(layout, ac, memory, _reason(size, tokens, layout, ac, memory, memory_bytes,
                                            per_rank(layout), act_bytes, len(fits),
                                            len(options), state_bytes))


def device_memory_bytes(device: torch.device, local_processes: int) -> int:
    """Memory one rank may use: a GPU's total memory, or on the CPU the machine's physical memory
    shared by the ``local_processes`` ranks on it (``parallel.memory_gib: 0``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(1, local_processes)


def _describe(layout: Layout, ac: bool) -> str:
    parts = [f"pp={layout.pp}"] if layout.pp > 1 else []
    parts += [f"dp_replicate={layout.dp_replicate}", f"dp_shard={layout.dp_shard}",
              f"tp={layout.tp}", f"sp={layout.sp}" + (f" ({layout.sp_mode})" if layout.sp > 1
                                                      else "")]
    if layout.dchag:
        parts.append(f"dchag={layout.dchag}")
    if ac:
        parts.append("activation checkpointing")
    return ", ".join(parts)


def _reason(size: ModelSize, tokens: int, layout: Layout, ac: bool, memory: dict,
            cap: float, batch: int, act_bytes: int, n_fit: int, n_all: int,
            state_bytes: int = 4) -> str:
    """Why: the estimate vs the budget, and what each non-trivial choice saves."""
    lines = [f"{_describe(layout, ac)}: estimated {memory['total'] / GIB:.2f} GiB per rank of "
             f"{cap / GIB:.2f} GiB (model states {memory['model_states'] / GIB:.2f}, "
             f"activations {memory['activations'] / GIB:.2f}); the least communication among "
             f"{n_fit} of {n_all} candidate layouts that fit"]
    simpler = []
    if layout.tp > 1:
        simpler.append(("tp", replace(layout, tp=1, dchag=None,
                                      dp_replicate=layout.dp_replicate * layout.tp), ac))
    if layout.sp > 1:
        simpler.append(("sp", replace(layout, sp=1, sp_mode="ulysses",
                                      dp_replicate=layout.dp_replicate * layout.sp), ac))
    if layout.dp_shard > 1:
        simpler.append(("fsdp", replace(layout, dp_shard=1,
                                        dp_replicate=layout.dp_replicate * layout.dp_shard), ac))
    if layout.pp > 1:
        simpler.append(("pp", replace(layout, pp=1,
                                      dp_replicate=layout.dp_replicate * layout.pp), ac))
    if ac:
        simpler.append(("activation checkpointing", layout, False))
    for name, other, other_ac in simpler:
        need = estimate_memory(size, tokens, other, batch, other_ac, act_bytes,
                               state_bytes)["total"]
        lines.append(f"without {name}: {need / GIB:.2f} GiB per rank")
    if layout.pp > 1:
        lines.append(f"pp={layout.pp}: each stage holds {size.cfg.depth // layout.pp} of "
                     f"{size.cfg.depth} blocks; the bubble idles (pp-1)/(micro-batches+pp-1) of "
                     "a step, so raise parallel.microbatches where the batch allows")
    if layout.sp > 1:
        lines.append("sp_mode lss: num_heads does not divide by tp*sp" if layout.sp_mode == "lss"
                     else "sp_mode ulysses: heads split over sp, no full K/V per rank")
    return "; ".join(lines)


def _parse_pixels(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--coarse-pixels wants HxW like 128x256, got {text!r}") from None
    return h, w


def main(argv: list[str] | None = None) -> Plan:
    """Print a plan (``python -m downscaler.parallel.planner --help``)."""
    ap = argparse.ArgumentParser(prog="python -m downscaler.parallel.planner",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", required=True, choices=sorted(PRESETS))
    ap.add_argument("--world", type=int, required=True, help="number of processes (GPUs)")
    ap.add_argument("--memory-gib", type=float, default=64.0, help="memory per device, GiB")
    ap.add_argument("--coarse-pixels", type=_parse_pixels, default=(128, 256),
                    help="coarse pixels of one tile, HxW")
    ap.add_argument("--tiles", type=int, default=1,
                    help="tiles in one sequence (tokens = coarse pixels / patch^2 x tiles)")
    ap.add_argument("--batch", type=int, default=1, help="samples per data-parallel rank")
    ap.add_argument("--channels", type=int, nargs=3, default=(4, 2, 2),
                    metavar=("IN", "OUT", "STATIC"), help="variable counts")
    ap.add_argument("--bf16", action="store_true", help="activations in bf16 (2 bytes)")
    ap.add_argument("--dchag", action="store_true",
                    help="allow D-CHAG (a different channel-aggregation architecture)")
    args = ap.parse_args(argv)
    size = ModelSize.from_preset(args.preset, *args.channels)
    tokens = tokens_per_tile(*args.coarse_pixels, size.cfg.patch_size) * args.tiles
    plan = plan_layout(size, tokens, args.world, args.memory_gib * GIB, args.batch,
                       2 if args.bf16 else 4, args.dchag)
    print(f"preset {args.preset}: {size.block_params + size.other_params:,} parameters, "
          f"{tokens:,} tokens, {args.world} processes, {args.memory_gib} GiB each")
    print("proposed parallel config:", plan.as_config())
    print("reason:", plan.reason)
    return plan


if __name__ == "__main__":
    main()
