"""Per-rank functions for tests/test_parallel.py (module level, so ``spawn`` can pickle them).

Every rank builds the same tiny float64 Reslim twice from one seed: a single-process reference
that sees the full batch, and a copy parallelized with the layout under test that sees the
rank's share. Both take the same steps; the functions return the largest differences (forward
outputs, gradients gathered to full tensors, parameters after AdamW steps) for the parent test
to assert, so a failure message names the layout and the quantity.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from downscaler.model.layers import Block
from downscaler.model.presets import build_model
from downscaler.parallel import Layout, build_mesh, parallelize, reduce_gradients, shard_batch
from downscaler.parallel.tensor_parallel import apply_tensor_parallel
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

DTYPE = torch.float64
RES_KM = 25.0
BATCH = 4
COARSE = 8  # coarse tile 8x8, patch 2 -> 16 tokens


def make_model(seed: int = 0, depth: int = 2) -> nn.Module:
    """The tiny Reslim shrunk further, float64, every parameter perturbed (non-zero biases)."""
    torch.manual_seed(seed)
    model = build_model(
        "tiny",
        ["t2m", "tp"],
        ["t2m"],
        ["orog", "lsm"],
        embed_dim=32,
        depth=depth,
        num_heads=4,
        mag=2,
        decoder_depth=1,
        residual_channels=8,
    ).to(DTYPE)
    with torch.no_grad():
        for p in model.parameters():
            # Zero biases / unit norms would hide a bias added tp times or a missing reduction.
            p.add_(0.05 * torch.randn_like(p))
    return model


def make_batch(step: int, batch: int = BATCH, coarse: int = COARSE) -> tuple[Tensor, ...]:
    """Global batch number ``step``: identical on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    fine = 2 * coarse
    x = torch.randn(batch, 2, coarse, coarse, generator=g, dtype=DTYPE)
    static = torch.randn(batch, 2, fine, fine, generator=g, dtype=DTYPE)
    y = torch.randn(batch, 1, fine, fine, generator=g, dtype=DTYPE)
    return x, static, y


def _full(t: Tensor) -> Tensor:
    """A full, plain tensor from a (possibly sharded) DTensor; collective over its mesh."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _name(name: str) -> str:
    return name.removeprefix("module.")


def _max_diff(model: nn.Module, ref: nn.Module, grads: bool) -> tuple[float, int]:
    """Largest |parallel - reference| over all parameters (or their gradients), and the count.

    Every rank walks the parameters in the same order, so the gathers line up. D-CHAG's
    tokenizer / aggregator (different names and per-rank shards) are gathered with its own
    ``gather_state`` and compared with the single-process ``DchagReference`` twin.
    """
    ref_params = dict(ref.named_parameters())
    worst, count = 0.0, 0
    pairs = []
    dchag = _is_dchag(model)
    for name, p in model.named_parameters():
        name = _name(name)
        if dchag and name.startswith(("tokenizer.", "aggregator.")):
            continue
        pairs.append((name, _full((p.grad if grads else p).detach()), ref_params[name]))
    if dchag:
        from downscaler.parallel.dchag import gather_state

        pairs += [(n, t, ref_params[n]) for n, t in gather_state(model, grads=grads).items()]
    if len(pairs) != len(ref_params):
        raise AssertionError(f"compared {len(pairs)} tensors, the reference has {len(ref_params)}")
    for name, full, r in pairs:
        b = r.grad if grads else r
        if b is None:
            raise AssertionError(f"{name}: reference gradient missing")
        if full.shape != b.shape:
            raise AssertionError(f"{name}: gathered shape {tuple(full.shape)} != {tuple(b.shape)}")
        worst = max(worst, (full - b).abs().max().item())
        count += 1
    return worst, count


def _is_dchag(model: nn.Module) -> bool:
    return type(getattr(model, "tokenizer", None)).__name__ == "DchagTokenizer"


def reference_model(layout: Layout) -> nn.Module:
    """The single-process twin: ``make_model()``, or its D-CHAG twin when the layout uses it."""
    ref = make_model()
    if layout.dchag is not None:
        from downscaler.parallel.dchag import DchagReference, reference_reslim

        ref = reference_reslim(ref, DchagReference.from_model(ref, layout.tp, layout.dchag))
    return ref


def _dp_slice(layout: Layout, mesh, batch: int) -> slice:
    rank = mesh["dp_replicate"].get_local_rank() * layout.dp_shard
    rank += mesh["dp_shard"].get_local_rank()
    local = batch // layout.dp
    return slice(rank * local, (rank + 1) * local)


def parity(layout: Layout, activation_checkpointing: bool = False, steps: int = 3) -> dict:
    """Forward / gradient / AdamW-step parity of ``layout`` against one process, on this rank."""
    mesh = build_mesh(layout)
    ref = reference_model(layout)
    model = parallelize(make_model(), layout, mesh, activation_checkpointing)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    out: dict = {"out": 0.0, "loss": 0.0, "grad": 0.0, "param": 0.0}
    for step in range(steps):
        x, static, y = make_batch(step)
        opt_ref.zero_grad()
        opt.zero_grad()
        pred_ref = ref(x, static, RES_KM)
        F.mse_loss(pred_ref, y).backward()
        xl, sl, yl = shard_batch(x, static, y, layout, mesh)
        pred = model(xl, sl, RES_KM)
        loss = F.mse_loss(pred, yl)  # mean over the local batch
        loss.backward()
        reduce_gradients(model, layout, mesh)
        sl_ = _dp_slice(layout, mesh, x.shape[0])
        out["out"] = max(out["out"], (pred - pred_ref[sl_]).abs().max().item())
        loss_ref_local = F.mse_loss(pred_ref[sl_], y[sl_]).item()
        out["loss"] = max(out["loss"], abs(loss.item() - loss_ref_local))
        grad_diff, out["n_grads"] = _max_diff(model, ref, grads=True)
        out["grad"] = max(out["grad"], grad_diff)
        opt_ref.step()
        opt.step()
        param_diff, out["n_params"] = _max_diff(model, ref, grads=False)
        out["param"] = max(out["param"], param_diff)
    # Evidence the comparison is not vacuous: the parameters did move.
    out["moved"] = max(
        (p - r).abs().max().item()
        for p, r in zip(ref.parameters(), reference_model(layout).parameters(), strict=True)
    )
    return out


def run_parity(rank: int, world_size: int, cases: list[tuple[dict, bool]]) -> list[dict]:
    """``parity`` for each ``(layout config, activation_checkpointing)`` in ``cases``."""
    # Gathering 2-D (FSDP x TP) gradients for the comparison warns about two all-gathers.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    return [parity(Layout.from_config(cfg), ac) for cfg, ac in cases]


def tp_bias_check(rank: int, world_size: int) -> dict:
    """Row-parallel bias under TP: attention and MLP outputs vs. one process, with large biases.

    Returns the difference to the reference and to the "bias added on every rank" result
    (reference + (tp - 1) * b), which the correct implementation must NOT match.
    """
    torch.manual_seed(3)
    ref = Block(32, 4).to(DTYPE)
    with torch.no_grad():
        for lin in (ref.attn.qkv, ref.attn.proj, ref.mlp.fc1, ref.mlp.fc2):
            lin.bias.uniform_(0.5, 1.5)
    holder = nn.Module()
    holder.block = Block(32, 4).to(DTYPE)
    holder.block.load_state_dict(ref.state_dict())
    mesh = build_mesh(Layout(tp=world_size))
    apply_tensor_parallel(holder, mesh["tp"])
    x = torch.randn(2, 16, 32, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    block = holder.block
    res = {"local_heads": block.attn.n_heads}
    for name, fn, fn_ref, bias in (
        ("attn", block.attn, ref.attn, ref.attn.proj.bias),
        ("mlp", block.mlp, ref.mlp, ref.mlp.fc2.bias),
    ):
        got, want = fn(x), fn_ref(x)
        res[f"{name}_diff"] = (got - want).abs().max().item()
        naive = want + (world_size - 1) * bias.detach()
        res[f"{name}_naive_diff"] = (got - naive).abs().max().item()
    got = block(x)
    got.sum().backward()
    ref(x).sum().backward()
    res["block_diff"] = (got - ref(x)).abs().max().item()
    bias_grads = [
        (block.attn.proj.bias.grad, ref.attn.proj.bias.grad),
        (block.mlp.fc2.bias.grad, ref.mlp.fc2.bias.grad),
    ]
    res["bias_grad_diff"] = max((_full(a) - b).abs().max().item() for a, b in bias_grads)
    return res


def _error(fn, *args) -> str | None:
    """The message of the ValueError ``fn(*args)`` raises, or None if it does not raise."""
    try:
        fn(*args)
    except ValueError as err:
        return f"{type(err).__name__}: {err}"
    return None


def error_paths(rank: int, world_size: int) -> dict:
    """Errors that need a process group: uneven sequence under SP, uneven batch under DP, a mesh
    that does not match the layout, a layout that does not match the world size."""
    res = {}
    layout = Layout(sp=world_size)
    mesh = build_mesh(layout)
    model = parallelize(make_model(), layout, mesh)
    x, static, y = make_batch(0, coarse=6)  # 3x3 = 9 tokens
    res["sequence"] = _error(model, x, static, RES_KM)
    dp_layout = Layout(dp_shard=world_size)
    dp_mesh = build_mesh(dp_layout)
    x, static, y = make_batch(0, batch=2 * world_size + 1)
    res["batch"] = _error(shard_batch, x, static, y, dp_layout, dp_mesh)
    res["mesh"] = _error(parallelize, make_model(), dp_layout, mesh)
    res["world"] = _error(parallelize, make_model(), Layout(tp=2 * world_size), mesh)
    return res


def misc_checks(rank: int, world_size: int) -> dict:
    """``tp_bias_check`` and ``error_paths`` in one spawn (process start-up dominates)."""
    return {"bias": tp_bias_check(rank, world_size), "errors": error_paths(rank, world_size)}


def fail_on_rank_one(rank: int, world_size: int) -> int:
    """Rank 1 raises while the others wait in a collective it never joins."""
    if rank == 1:
        raise ValueError("deliberate failure for the launch test")
    torch.distributed.barrier()
    return rank


def sum_of_ranks(rank: int, world_size: int, offset: int) -> float:
    """All-reduce of ``rank + offset``: checks the group and the passing of extra arguments."""
    t = torch.tensor(float(rank + offset))
    torch.distributed.all_reduce(t)
    return t.item()


@torch.no_grad()
def _average_over_data_parallel(module: torch.nn.Module, dp_group) -> None:
    """The stage's gradients averaged over its data-parallel replicas by hand (what the engine's
    ``reduce_gradients`` does for a pipeline stage), for the standalone pipeline cases."""
    world = torch.distributed.get_world_size(dp_group)
    for g in (p.grad for p in module.parameters() if p.grad is not None):
        torch.distributed.all_reduce(g, group=dp_group)
        g.div_(world)


def pipeline_parity(rank: int, world_size: int, schedule: str, n_micro: int,
                    steps: int = 3, dp: int = 1) -> dict:
    depth = world_size // dp  # one block per stage
    """Pipeline over ``world_size`` stages vs one process: loss and the parameters this stage
    owns after ``steps`` AdamW steps (float64)."""
    from downscaler.parallel.pipeline import make_schedule, pipeline_stage
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dp, depth), mesh_dim_names=("dp", "pp"))
    pp_rank, dp_rank = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank()
    ref = make_model(depth=depth)
    model = make_model(depth=depth)
    names = {id(p): n for n, p in model.named_parameters()}
    stage, module = pipeline_stage(model, pp_rank, depth, torch.device("cpu"),
                                   group=mesh["pp"].get_group())
    owned = {names[id(p)]: p for p in module.parameters()}
    pipe = make_schedule(stage, schedule, n_micro, F.mse_loss)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3, weight_decay=0.01)
    last = pp_rank == depth - 1
    out = {"loss": 0.0, "grad": 0.0, "param": 0.0, "owned": sorted(owned)}
    ref_params = dict(ref.named_parameters())
    for step in range(steps):
        x, static, y = make_batch(step)
        res = torch.full((x.shape[0],), RES_KM, dtype=DTYPE)
        opt_ref.zero_grad()
        opt.zero_grad()
        loss_ref = F.mse_loss(ref(x, static, res), y)
        loss_ref.backward()
        opt_ref.step()
        losses: list = []
        local = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
        x, static, y, res = x[local], static[local], y[local], res[local]
        if pp_rank == 0:
            pipe.step(x, static, res, target=y if last else None, losses=losses)
        else:
            pipe.step(target=y if last else None, losses=losses)
        if dp > 1:
            _average_over_data_parallel(module, mesh["dp"].get_group())
        if last:
            loss = torch.stack(losses).mean()  # equal micro-batches: mean of means
            if dp > 1:
                torch.distributed.all_reduce(loss, group=mesh["dp"].get_group())
                loss /= dp
            out["loss"] = max(out["loss"], abs(loss.item() - loss_ref.item()))
        # gradients too: AdamW's update hardly changes if every gradient is scaled alike
        diff = max((p.grad - ref_params[n].grad).abs().max().item() for n, p in owned.items())
        out["grad"] = max(out["grad"], diff)
        opt.step()
        diff = max((p - ref_params[n]).abs().max().item() for n, p in owned.items())
        out["param"] = max(out["param"], diff)
    out["n_ref"] = len(ref_params)
    out["moved"] = max((p - q).abs().max().item()
                       for p, q in zip(ref.parameters(), make_model(depth=depth).parameters(),
                                       strict=True))
    return out


def pipeline_cases(rank: int, world_size: int, cases_: list[tuple]) -> list[dict]:
    """``pipeline_parity`` for each ``(schedule, micro-batches[, dp])``, in one spawned world."""
    return [pipeline_parity(rank, world_size, s, m, dp=c[0] if c else 1) for s, m, *c in cases_]


def long_sequence_attention_peak(rank: int, world_size: int, mode: str, tokens: int) -> dict:
    """Peak tensor bytes (MemTracker) of one sequence-parallel attention forward + backward at
    ``tokens`` tokens (float32, the dtype the CPU flash kernel serves), and the output's
    difference from plain attention on the full sequence."""
    from downscaler.model.layers import Attention
    from downscaler.parallel.lss import LssAttention
    from downscaler.parallel.sequence_parallel import UlyssesAttention
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(0)
    attn = Attention(32, 4)
    ref = Attention(32, 4)
    ref.load_state_dict(attn.state_dict())
    attn.__class__ = LssAttention if mode == "lss" else UlyssesAttention
    attn.sp_group = torch.distributed.group.WORLD
    x = torch.randn(1, tokens, 32, generator=torch.Generator().manual_seed(1))
    local = x.chunk(world_size, dim=1)[rank].clone().requires_grad_()
    tracker = MemTracker()
    tracker.track_external(attn)
    with tracker:
        out = attn(local)
        out.sum().backward()
    peak = int(sum(v["Total"] for v in tracker.get_tracker_snapshot("peak").values()))
    with torch.no_grad():
        diff = (out - ref(x).chunk(world_size, dim=1)[rank]).abs().max().item()
    return {"peak": peak, "diff": diff}
