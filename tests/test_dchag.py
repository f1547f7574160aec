"""D-CHAG parity: sharded over spawned gloo processes vs a single-process ``DchagReference``.

Each spawn (``downscaler.launcher.spawn``) runs several checks and returns tensors; the
assertions run here in the test process. Float64 and tiny dimensions, so agreement is to ~1e-15
and a spawn takes a few seconds.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from downscaler.checkpoint import load_checkpoint, write_checkpoint
from downscaler.launcher import spawn
from downscaler.model.presets import build_model
from downscaler.model.reslim import Reslim
from downscaler.parallel import Layout, build_mesh, parallelize, reduce_gradients, shard_batch
from downscaler.parallel.dchag import (
    VARIANTS,
    ChannelTree,
    DchagReference,
    apply_dchag,
    channel_blocks,
    gather_state,
    load_partition,
    reference_model,
    reference_reslim,
)
from downscaler.parallel.train_state import dchag_metadata, full_model_state
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

TOL = 1e-10
IN_VARS, STATICS = ["a", "b", "c", "d", "e"], ["orog", "lsm", "lat"]  # C = 8
OUT_VARS = ["a", "c"]
BATCH, H, W, RES_KM = 4, 4, 6, 100.0


# --------------------------------------------------------------------------- shared set-up
def tiny_model() -> Reslim:
    """A float64 Reslim small enough to spawn cheaply; the same weights in every process."""
    torch.manual_seed(0)
    model = build_model(
        "tiny",
        IN_VARS,
        OUT_VARS,
        STATICS,
        embed_dim=16,
        depth=1,
        num_heads=4,
        mag=2,
        decoder_depth=1,
        residual_channels=4,
    )
    return model.double()


def perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Randomise weights, so parity does not rest on the init (e.g. the mean-initialised linear
    reducer treats all channels alike)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def tiny_reference(model: Reslim, tp: int, variant: str) -> DchagReference:
    """The D-CHAG reference of ``model`` with randomised D-CHAG weights."""
    ref = DchagReference.from_model(model, tp, variant)
    perturb(ref)
    return ref


def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Coarse inputs and fine statics, the same in every process."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, len(IN_VARS), H, W, generator=gen, dtype=torch.float64)
    static = torch.randn(BATCH, len(STATICS), 2 * H, 2 * W, generator=gen, dtype=torch.float64)
    return x, static


def loss_of(out: torch.Tensor) -> torch.Tensor:
    """A loss that weights every output element differently (a plain mean would hide mix-ups)."""
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype).reshape(out.shape)
    return (w * out**2).mean()


# --------------------------------------------------------------------------- per-rank workers
def pack(obj: object) -> bytes:
    """Serialise a worker's tensors to bytes: a tensor put on a multiprocessing queue travels as
    a shared-memory handle that dies with the worker process before the parent reads it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(data: bytes) -> dict:
    """Inverse of ``pack``."""
    return torch.load(io.BytesIO(data), weights_only=False)


def _tp_worker(rank: int, world: int) -> bytes:
    """Tensor-parallel D-CHAG on all ranks: every variant, plus the own-block and bias checks."""
    group = dist.group.WORLD
    x, static = tiny_batch()
    results: dict[str, object] = {}
    for variant in VARIANTS:
        model = tiny_model()
        ref = tiny_reference(model, world, variant)
        rng = torch.get_rng_state()
        apply_dchag(model, group, variant)
        rng_kept = torch.equal(rng, torch.get_rng_state())  # dropout masks as without D-CHAG
        load_partition(model, ref)
        out = model(x, static, RES_KM)
        loss_of(out).backward()
        results[variant] = {
            "rng_kept": rng_kept,
            "out": out.detach(),
            "dchag_weights": gather_state(model),
            "dchag_grads": gather_state(model, grads=True),
            "grads": {
                n: p.grad.clone()
                for n, p in model.named_parameters()
                if not n.startswith(("tokenizer.", "aggregator."))
            },
            "n_local_params": {
                "tokenizer": sum(p.numel() for p in model.tokenizer.parameters()),
                "aggregator": sum(p.numel() for p in model.aggregator.parameters()),
            },
        }
        # Own block: zero each channel in turn; record every rank's partial token.
        with torch.no_grad():
            base = model.tokenizer(x, static)
            changed = []
            for c in range(len(IN_VARS) + len(STATICS)):
                xz, sz = x.clone(), static.clone()
                if c < len(IN_VARS):
                    xz[:, c] = 0.0
                else:
                    sz[:, c - len(IN_VARS)] = 0.0
                diff = (model.tokenizer(xz, sz) - base).abs().amax(dim=(0, 2, 3))
                changed.append(diff)
            results[variant]["partials"] = base
            results[variant]["partial_change"] = torch.stack(changed)  # [C, tp]
    # Bias once: with the row-parallel weight zeroed, the output is exactly the bias.
    model = apply_dchag(tiny_model(), group, "linear")
    agg = model.aggregator
    with torch.no_grad():
        agg.proj.weight.zero_()
        agg.proj_bias.copy_(torch.arange(agg.proj_bias.numel(), dtype=torch.float64) + 1.0)
        tokens = model.tokenizer(x, static)
        results["bias_out"] = agg(tokens)
        results["bias"] = agg.proj_bias.clone()
    # Errors raised on a real TP group.
    errors = {}
    for name, kwargs in {
        "channels": {"in_vars": IN_VARS[:4], "static_vars": ["orog"]},  # C = 5
        "heads": {"num_heads": 1, "in_vars": IN_VARS, "static_vars": STATICS},
    }.items():
        params = {"embed_dim": 16, "depth": 1, "num_heads": 4, "mag": 2, **kwargs}
        m = build_model("tiny", params.pop("in_vars"), ["a"], params.pop("static_vars"), **params)
        try:
            apply_dchag(m, group, "linear")
            errors[name] = ""
        except ValueError as err:
            errors[name] = str(err)
    results["errors"] = errors
    return pack(results)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full gradients of the non-D-CHAG parameters (DTensor ones gathered: collective)."""
    out = {}
    for n, p in model.named_parameters():
        if n.startswith(("tokenizer.", "aggregator.")):
            continue
        g = p.grad
        out[n] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    return out


def _local_loss(out: torch.Tensor, rows: slice) -> torch.Tensor:
    """``loss_of`` restricted to this rank's rows, scaled so the dp average is the full mean."""
    w = torch.linspace(0.5, 1.5, BATCH * out[0].numel(), dtype=out.dtype)
    w = w.reshape(BATCH, *out.shape[1:])[rows]
    return (w * out**2).sum() / (out.shape[0] * out[0].numel())


def _dp_worker(rank: int, world: int) -> bytes:
    """World size 4 = dp 2 x tp 2: D-CHAG + DDP by hand, then D-CHAG + TP + data parallel via
    ``parallelize``; every case on half of the batch per data-parallel rank."""
    mesh = build_mesh(Layout(dp_replicate=2, tp=2))
    x, static = tiny_batch()
    half = BATCH // 2
    dp_rank = mesh["dp_replicate"].get_local_rank()
    rows = slice(dp_rank * half, (dp_rank + 1) * half)
    results = {}
    # D-CHAG-C by hand + DDP over the data-parallel group, reference weights loaded per rank.
    model = tiny_model()
    ref = tiny_reference(model, 2, "cross")
    apply_dchag(model, mesh["tp"], "cross")
    load_partition(model, ref)
    ddp = DistributedDataParallel(model, process_group=mesh["dp_replicate"].get_group())
    _local_loss(ddp(x[rows], static[rows], RES_KM), rows).backward()  # DDP averages over dp
    results["ddp"] = {"dchag_grads": gather_state(model, grads=True), "grads": _grads(model)}
    # The project's composition: D-CHAG -> TP of the blocks -> data parallel, per its contract.
    for variant in ("linear", "cross"):
        layout = Layout(dp_replicate=2, tp=2, dchag=variant)
        model = tiny_model()
        perturb(model)  # before D-CHAG, which derives its weights from the model's
        train = parallelize(model, layout, mesh)
        xs, ss, _ = shard_batch(x, static, None, layout, mesh)
        out = train(xs, ss, RES_KM)
        _local_loss(out, rows).backward()
        reduce_gradients(train, layout, mesh)
        results[variant] = {"dchag_grads": gather_state(model, grads=True), "grads": _grads(model)}
    return pack(results)


TREE_VARIANTS = ("tree-linear", "tree-cross")
STEPS = 3


def _adamw_steps(model: torch.nn.Module, step_fn) -> list[float]:
    """``STEPS`` AdamW steps of ``step_fn() -> loss`` (which also reduces gradients)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        losses.append(step_fn().item())
        opt.step()
    return losses


def _tree_train_worker(rank: int, world: int, ckpt_dir: str) -> bytes:
    """Tree D-CHAG through ``parallelize`` (D-CHAG + TP of the blocks) on tp=2: a few AdamW
    steps, then the consolidated checkpoint as training writes it (rank 0)."""
    mesh = build_mesh(Layout(tp=2))
    x, static = tiny_batch()
    results = {}
    for variant in TREE_VARIANTS:
        layout = Layout(tp=2, dchag=variant)
        model = tiny_model()
        perturb(model)
        train = parallelize(model, layout, mesh)

        def step(train=train, layout=layout) -> torch.Tensor:
            xs, ss, _ = shard_batch(x, static, None, layout, mesh)
            loss = loss_of(train(xs, ss, RES_KM))
            loss.backward()
            reduce_gradients(train, layout, mesh)
            return loss

        losses = _adamw_steps(train, step)
        with torch.no_grad():
            out = train(x, static, RES_KM)
        state = full_model_state(model)  # collective
        path = f"{ckpt_dir}/{variant}.pt"
        if rank == 0:
            write_checkpoint(path, vars(model.cfg), state, dchag=dchag_metadata(model))
        results[variant] = {"losses": losses, "out": out.detach(), "state": state, "path": path}
    return pack(results)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tp_results() -> list[dict]:
    """One 2-process spawn shared by the tensor-parallel tests."""
    return [unpack(b) for b in spawn(_tp_worker, 2)]


@pytest.fixture(scope="module")
def dp_results() -> list[dict]:
    """One 4-process spawn shared by the composed (dp 2 x tp 2) tests."""
    return [unpack(b) for b in spawn(_dp_worker, 4)]


@pytest.fixture(scope="module")
def tree_results(tmp_path_factory) -> list[dict]:
    """One 2-process spawn: tree D-CHAG trained a few AdamW steps, checkpoints written."""
    ckpt_dir = tmp_path_factory.mktemp("tree_ckpt")
    return [unpack(b) for b in spawn(_tree_train_worker, 2, str(ckpt_dir))]


def reference_run(variant: str, tp: int, perturb_model: bool = False) -> dict:
    """The single-process reference: output, D-CHAG weights/grads, other grads.

    ``perturb_model``: randomise the Reslim before deriving D-CHAG from it (as the workers that
    go through ``parallelize`` do) instead of randomising the D-CHAG reference.
    """
    model = tiny_model()
    if perturb_model:
        perturb(model)
        ref = DchagReference.from_model(model, tp, variant)
    else:
        ref = tiny_reference(model, tp, variant)
    twin = reference_reslim(model, ref)
    x, static = tiny_batch()
    out = twin(x, static, RES_KM)
    loss_of(out).backward()
    dchag_keys = ("tokenizer.", "aggregator.")
    return {
        "out": out.detach(),
        "partials": twin.tokenizer(x, static).detach(),
        "dchag_weights": {
            n: p.detach() for n, p in twin.named_parameters() if n.startswith(dchag_keys)
        },
        "dchag_grads": {n: p.grad for n, p in twin.named_parameters() if n.startswith(dchag_keys)},
        "grads": {n: p.grad for n, p in twin.named_parameters() if not n.startswith(dchag_keys)},
    }


def assert_close_dicts(got: dict, want: dict, what: str, tol: float = TOL) -> None:
    assert got.keys() == want.keys(), f"{what}: keys differ: {set(got) ^ set(want)}"
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        assert err < tol, f"{what} {name}: max abs error {err:.3g}"


# --------------------------------------------------------------------------- tests
def test_channel_blocks_partition_inputs_then_statics() -> None:
    blocks = channel_blocks(5, 3, 2)
    assert blocks == [(0, 4, 0, 0), (4, 5, 0, 3)]
    assert [b.n_inputs + b.n_statics for b in channel_blocks(5, 3, 4)] == [2, 2, 2, 2]
    assert channel_blocks(5, 3, 4)[2] == (4, 5, 0, 1)  # mixed block: last input + first static


def test_channel_blocks_not_divisible_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"in_vars \+ static_vars = 5 \+ 2 = 7.*tp=2"):
        channel_blocks(5, 2, 2)
    with pytest.raises(ValueError, match="tp must be an integer"):
        channel_blocks(4, 0, 0)


def test_unknown_variant_and_reused_model_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown D-CHAG variant='tree'"):
        apply_dchag(tiny_model(), None, "tree")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tp_mesh must be"):
        apply_dchag(tiny_model(), None, "linear")  # type: ignore[arg-type]
    model = tiny_model()
    twin = reference_reslim(model, DchagReference.from_model(model, 2, "linear"))
    with pytest.raises(TypeError, match="apply D-CHAG once"):
        DchagReference.from_model(twin, 2, "linear")


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_and_gradients_match_reference(tp_results, variant) -> None:
    want = reference_run(variant, tp=2)
    for rank, res in enumerate(tp_results):
        got = res[variant]
        assert got["rng_kept"], "apply_dchag changed the global RNG state"
        err = (got["out"] - want["out"]).abs().max().item()
        assert err < TOL, f"rank {rank} output differs by {err:.3g}"
        assert_close_dicts(got["dchag_weights"], want["dchag_weights"], "D-CHAG weight")
        assert_close_dicts(got["dchag_grads"], want["dchag_grads"], "D-CHAG grad")
        assert_close_dicts(got["grads"], want["grads"], "replicated grad")
        assert all(g.abs().max() > 0 for g in want["dchag_grads"].values())  # not vacuous


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_rank_embeds_its_own_block(tp_results, variant) -> None:
    want = reference_run(variant, tp=2)
    blocks = channel_blocks(len(IN_VARS), len(STATICS), 2)
    per = (len(IN_VARS) + len(STATICS)) // 2
    for res in tp_results:
        partials = res[variant]["partials"]
        assert (partials - want["partials"]).abs().max() < TOL
        change = res[variant]["partial_change"]  # [channel, owner rank]
        for c in range(change.shape[0]):
            owner = c // per
            assert change[c, owner] > 1e-6, f"channel {c} does not reach rank {owner}'s token"
            others = [r for r in range(2) if r != owner]
            assert change[c, others].abs().max() == 0.0, f"channel {c} leaks to another rank"
    # Local parameter counts reflect the block: rank 1 owns 1 input + 3 statics (bigger kernels).
    assert blocks[1].n_statics == 3
    n0 = tp_results[0]["linear"]["n_local_params"]["tokenizer"]
    n1 = tp_results[1]["linear"]["n_local_params"]["tokenizer"]
    assert n1 > n0


def test_row_parallel_bias_is_added_once(tp_results) -> None:
    for res in tp_results:
        bias, out = res["bias"], res["bias_out"]
        assert torch.equal(out, bias.expand_as(out))  # tp * bias would fail


def test_not_divisible_errors_on_a_real_group(tp_results) -> None:
    errors = tp_results[0]["errors"]
    assert "4 + 1 = 5" in errors["channels"] and "tp=2" in errors["channels"]
    assert "num_heads=1" in errors["heads"]


def test_dchag_times_ddp_matches_full_batch_reference(dp_results) -> None:
    want = reference_run("cross", tp=2)
    for rank, res in enumerate(dp_results):
        got = res["ddp"]
        assert_close_dicts(got["dchag_grads"], want["dchag_grads"], f"rank {rank} D-CHAG grad")
        assert_close_dicts(got["grads"], want["grads"], f"rank {rank} replicated grad")


@pytest.mark.parametrize("variant", ["linear", "cross"])
def test_parallelize_dchag_tp_dp_matches_full_batch_reference(dp_results, variant) -> None:
    want = reference_run(variant, tp=2, perturb_model=True)
    for rank, res in enumerate(dp_results):
        got = res[variant]
        assert_close_dicts(got["dchag_grads"], want["dchag_grads"], f"rank {rank} D-CHAG grad")
        assert_close_dicts(got["grads"], want["grads"], f"rank {rank} grad")


def _reference_training(variant: str) -> dict:
    """One process: the D-CHAG reference model of ``variant`` (tp=2) trained like the workers."""
    model = tiny_model()
    perturb(model)
    twin = reference_model(model, 2, variant)
    x, static = tiny_batch()

    def step() -> torch.Tensor:
        loss = loss_of(twin(x, static, RES_KM))
        loss.backward()
        return loss

    losses = _adamw_steps(twin, step)
    with torch.no_grad():
        out = twin(x, static, RES_KM)
    return {"losses": losses, "out": out, "state": twin.state_dict()}


def test_channel_tree_merges_pairs_level_by_level() -> None:
    tree = ChannelTree(5, lambda n: torch.nn.Linear(n, 1), group=2)
    assert [len(level) for level in tree.levels] == [3, 2, 1]  # 5 -> 3 -> 2 -> 1
    assert [node.in_features for node in tree.levels[0]] == [2, 2, 1]
    # tree-linear with mean-initialised nodes over 4 channels = plain mean; over 3 it weights the
    # unpaired channel by 1/2 (a tree, not one flat Linear).
    tokens = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    from downscaler.model.dchag_reference import ChannelLinear

    tree3 = ChannelTree(3, ChannelLinear, group=2).double()
    want = 0.25 * tokens[:, 0] + 0.25 * tokens[:, 1] + 0.5 * tokens[:, 2]
    assert torch.allclose(tree3(tokens), want, atol=1e-14)


@pytest.mark.parametrize("variant", TREE_VARIANTS)
def test_tree_dchag_adamw_steps_match_one_process(tree_results, variant) -> None:
    want = _reference_training(variant)
    assert want["losses"][0] != want["losses"][-1]  # the steps move the weights
    for rank, res in enumerate(tree_results):
        got = res[variant]
        for step, (a, b) in enumerate(zip(got["losses"], want["losses"], strict=True)):
            assert abs(a - b) < TOL * max(1.0, abs(b)), f"rank {rank} step {step}: {a} vs {b}"
        err = (got["out"] - want["out"]).abs().max().item()
        assert err < TOL, f"rank {rank} output after {STEPS} steps differs by {err:.3g}"
    # Rank 0's consolidated state is the reference model's, key for key. Adam divides by
    # sqrt(v) + eps, which magnifies 1e-16 gradient rounding where a gradient is tiny: 1e-9 as
    # in the engine tests (measured 1.1e-10 on one bias of tree-cross).
    assert_close_dicts(tree_results[0][variant]["state"], want["state"], "trained weight", 1e-9)


@pytest.mark.parametrize("variant", TREE_VARIANTS)
def test_tree_dchag_checkpoint_loads_for_inference(tree_results, variant) -> None:
    got = tree_results[0][variant]
    model, payload = load_checkpoint(got["path"])
    assert payload["dchag"] == {"variant": variant, "tp": 2}
    assert any(".reduce.levels.1." in k for k in payload["model_state"])  # a two-level tree
    # load_checkpoint builds a float32 model; redo the load in float64 to compare at 1e-10.
    model.double().load_state_dict(payload["model_state"])
    x, static = tiny_batch()
    with torch.no_grad():
        out = model(x, static, RES_KM)
    err = (out - got["out"]).abs().max().item()
    assert err < TOL, f"loaded checkpoint output differs from the trained model by {err:.3g}"
