"""Tests for the model package: Reslim, the UpsampleViT baseline, losses, presets, AC."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from downscaler.model import (
    PRESETS,
    Reslim,
    ReslimConfig,
    UpsampleViT,
    apply_activation_checkpointing,
    build_model,
    count_parameters,
    latitude_weights,
    mse_loss,
    tv_regularised_loss,
)
from downscaler.model.activation_checkpointing import is_checkpointed
from downscaler.model.layers import Block, VariableAggregator
from downscaler.model.loss import total_variation

IN_VARS = ["t2m", "tp", "u10"]
STATICS = ["orog", "lsm", "latitude"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP contention stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**kw) -> ReslimConfig:
    """A small config that runs in milliseconds on CPU."""
    base = dict(
        in_vars=IN_VARS,
        out_vars=["t2m", "tp"],
        static_vars=STATICS,
        mag=4,
        patch_size=2,
        embed_dim=32,
        depth=2,
        num_heads=4,
        decoder_depth=1,
        residual_channels=8,
    )
    base.update(kw)
    return ReslimConfig(**base)


def inputs(cfg: ReslimConfig, b=2, h=8, w=12, dtype=torch.float64, seed=0):
    """Random coarse input and fine statics matching ``cfg``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, len(cfg.in_vars), h, w, generator=g, dtype=dtype)
    s = torch.randn(b, len(cfg.static_vars), cfg.mag * h, cfg.mag * w, generator=g, dtype=dtype)
    return x, s


def bilinear(x: torch.Tensor, mag: int) -> torch.Tensor:
    return F.interpolate(x, scale_factor=mag, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- shapes, variables, init


@pytest.mark.parametrize("model_cls", [Reslim, UpsampleViT])
@pytest.mark.parametrize(("mag", "h", "w"), [(2, 6, 10), (3, 4, 8), (4, 8, 6), (1, 4, 4)])
def test_output_shape_any_mag_non_square(model_cls, mag, h, w):
    cfg = tiny_cfg(mag=mag)
    model = model_cls(cfg).double()
    x, s = inputs(cfg, b=3, h=h, w=w)
    y = model(x, s, 25.0)
    assert y.shape == (3, 2, mag * h, mag * w)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("model_cls", [Reslim, UpsampleViT])
def test_init_is_close_to_bilinear_upsampling(model_cls):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = model_cls(cfg).double()
    x, s = inputs(cfg)
    y = model(x, s, 25.0)
    up = bilinear(x[:, [0, 1]], cfg.mag)
    # Inputs have unit variance: a learned part below 0.05 means "starts as interpolation".
    assert (y - up).abs().max() < 0.05
    assert (y - up).abs().max() > 0  # ...but the learned branches are live


def test_out_vars_selected_and_ordered_by_name():
    torch.manual_seed(0)
    cfg = tiny_cfg(out_vars=["u10", "t2m"])
    model = Reslim(cfg).double()
    x, s = inputs(cfg)
    x[:, 0] += 10.0  # t2m far from the others: each output channel must follow its own input
    x[:, 2] -= 10.0  # u10
    y = model(x, s, 25.0)
    assert y.shape[1] == 2
    assert torch.allclose(y, bilinear(x[:, [2, 0]], cfg.mag), atol=0.1)
    assert cfg.out_index == [2, 0]


def test_resolution_scalar_equals_per_sample_and_matters():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = Reslim(cfg).double()
    x, s = inputs(cfg)
    a = model(x, s, 25.0)
    b = model(x, s, torch.tensor([25.0, 25.0], dtype=torch.float64))
    c = model(x, s, torch.tensor([25.0, 100.0], dtype=torch.float64))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[0], c[0])
    assert not torch.allclose(a[1], c[1])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for model in (Reslim(tiny_cfg()).double(), UpsampleViT(tiny_cfg()).double()):
        x, s = inputs(model.cfg)
        target = torch.randn(2, 2, 32, 48, dtype=torch.float64)
        mse_loss(model(x, s, 25.0), target).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, f"{type(model).__name__}.{name} got no gradient"
            assert p.grad.abs().sum() > 0, f"{type(model).__name__}.{name} gradient is zero"


def test_output_depends_on_fine_statics():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = Reslim(cfg).double()
    x, s = inputs(cfg)
    s2 = s.clone()
    s2[:, 0, 5, 7] += 1.0  # one fine orography pixel
    assert not torch.allclose(model(x, s, 25.0), model(x, s2, 25.0))
    # Both the transformer (via the static tokenizer) and the residual CNN see the statics.
    s.requires_grad_(True)
    model(x, s, 25.0).sum().backward()
    assert s.grad.abs().sum() > 0
    assert model.tokenizer.statics.embeds[0].weight.shape[-1] == cfg.patch_size * cfg.mag


def test_no_static_fields_is_allowed():
    cfg = tiny_cfg(static_vars=[])
    x, s = inputs(cfg)
    assert s.shape[1] == 0
    assert Reslim(cfg).double()(x, s, 25.0).shape == (2, 2, 32, 48)


def test_bf16_autocast_forward():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = Reslim(cfg)
    x, s = inputs(cfg, dtype=torch.float32)
    ref = model(x, s, 25.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x, s, 25.0)
    assert y.shape == ref.shape
    assert torch.isfinite(y).all()
    assert (y.float() - ref).abs().max() < 0.1


def test_meta_device_build_then_materialise():
    torch.manual_seed(0)
    cfg = tiny_cfg()
    with torch.device("meta"):
        model = Reslim(cfg)
    assert all(p.is_meta for p in model.parameters())
    model = model.to_empty(device="cpu")
    model.init_weights()
    x, s = inputs(cfg, dtype=torch.float32)
    y = model(x, s, 25.0)
    assert torch.isfinite(y).all()
    assert (y - bilinear(x[:, :2], cfg.mag)).abs().max() < 0.05


# ---------------------------------------------------------------- symmetry (parallelism-relevant)


def test_block_is_permutation_equivariant_over_tokens():
    """No hidden token-position mixing: sequence parallelism may reorder/shard tokens."""
    torch.manual_seed(0)
    block = Block(32, 4).double()
    z = torch.randn(2, 20, 32, dtype=torch.float64)
    perm = torch.randperm(20)
    torch.testing.assert_close(block(z[:, perm]), block(z)[:, perm])


def test_aggregator_is_permutation_invariant_over_variables():
    """Order of variables is irrelevant to the aggregation (D-CHAG gathers them in blocks)."""
    torch.manual_seed(0)
    agg = VariableAggregator(32, 4).double()
    tokens = torch.randn(2, 5, 7, 32, dtype=torch.float64)
    perm = torch.randperm(5)
    out = agg(tokens)
    assert out.shape == (2, 7, 32)
    torch.testing.assert_close(agg(tokens[:, perm]), out)


def test_n_heads_is_read_at_forward_time():
    """A TP plan shards qkv by whole heads and divides n_heads; halves must recombine."""
    torch.manual_seed(0)
    block = Block(32, 4).double()
    attn = block.attn
    z = torch.randn(2, 6, 32, dtype=torch.float64)
    full = attn.qkv(z)
    # Emulate 2-way column sharding of qkv (head-major) + row sharding of proj.
    parts = []
    for r in range(2):
        shard = copy.deepcopy(attn)
        rows = slice(r * 48, (r + 1) * 48)
        shard.qkv.weight.data = attn.qkv.weight.data[rows]
        shard.qkv.bias.data = attn.qkv.bias.data[rows]
        shard.proj.weight.data = attn.proj.weight.data[:, r * 16 : (r + 1) * 16]
        shard.proj.bias.data = attn.proj.bias.data / 2
        shard.n_heads = 2
        parts.append(shard(z))
    assert full.shape[-1] == 96
    torch.testing.assert_close(parts[0] + parts[1], attn(z))


# ---------------------------------------------------------------- training


def test_adamw_learns_orography_signal():
    """Target = bilinear(t2m) + 0.5 * fine orography; only the fine statics can explain it."""
    torch.manual_seed(0)
    cfg = tiny_cfg(out_vars=["t2m"], static_vars=["orog"], embed_dim=32, depth=1, num_heads=2)
    model = Reslim(cfg)
    b, h, w = 8, 8, 8
    x = torch.randn(b, 3, h, w)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    k = torch.randint(1, 8, (b, 2, 1, 1)).float()
    phase = torch.rand(b, 1, 1) * 2 * math.pi
    orog = torch.sin(2 * math.pi * (k[:, 0] * yy + k[:, 1] * xx) / 32 + phase)[:, None]
    target = bilinear(x[:, :1], 4) + 0.5 * orog
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = mse_loss(model(x, orog, 25.0), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5, losses
    with torch.no_grad():  # without the orography the skill is gone
        no_orog = mse_loss(model(x, torch.zeros_like(orog), 25.0), target).item()
    assert no_orog > 3 * losses[-1]


# ---------------------------------------------------------------- losses (hand-computed)

# pred P (one variable) on a 2x3 grid, target 0:
#   P = [[1, 2, 4],
#        [0, 3, 3]]
# MSE = (1 + 4 + 16 + 0 + 9 + 9) / 6 = 6.5
# |dy| = |[-1, 1, -1]| -> 1;  |dx| = [1, 2, 3, 0] -> 1.5
# diag P[1:,1:]-P[:-1,:-1] = [2, 1] -> 1.5;  anti P[1:,:-1]-P[:-1,1:] = [-2, -1] -> 1.5
# TV = 1 + 1.5 + 0.7 * (1.5 + 1.5) = 4.6
P = [[1.0, 2.0, 4.0], [0.0, 3.0, 3.0]]


def _pt(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_mse_and_tv_hand_computed():
    pred = _pt(P)[None]  # [1, 1, 2, 3]
    target = torch.zeros_like(pred)
    assert mse_loss(pred, target).item() == pytest.approx(6.5)
    assert total_variation(pred).tolist() == pytest.approx([4.6])
    assert tv_regularised_loss(pred, target).item() == pytest.approx(6.5 + 0.02 * 4.6)
    assert tv_regularised_loss(pred, target, tv_weight=0.0).item() == pytest.approx(6.5)


def test_variable_weights_hand_computed():
    # var 0: P vs 0 (mse 6.5, tv 4.6); var 1: 0 vs 1 (mse 1, tv 0); weights 10 : 1.
    pred = torch.stack([_pt(P)[0], torch.zeros(2, 3, dtype=torch.float64)])[None]
    target = torch.stack([torch.zeros(2, 3), torch.ones(2, 3)]).double()[None]
    w = torch.tensor([10.0, 1.0])
    assert mse_loss(pred, target, w).item() == pytest.approx((10 * 6.5 + 1) / 11)
    expected = (10 * (6.5 + 0.02 * 4.6) + 1 * 1.0) / 11
    assert tv_regularised_loss(pred, target, w).item() == pytest.approx(expected)
    # Equal weights of any scale give the plain mean.
    assert mse_loss(pred, target, torch.tensor([3.0, 3.0])).item() == pytest.approx(3.75)


def test_latitude_weights_hand_computed():
    # cos(0) = 1, cos(60) = 0.5, mean 0.75 -> [4/3, 2/3]
    lw = latitude_weights(torch.tensor([0.0, 60.0]))
    assert lw.tolist() == pytest.approx([4 / 3, 2 / 3])
    assert latitude_weights(torch.tensor([-90.0, 0.0, 90.0])).tolist() == pytest.approx(
        [0.0, 3.0, 0.0], abs=1e-12
    )
    pred = _pt(P)[None]
    # Row sums of squares 21 and 18: (4/3 * 21 + 2/3 * 18) / 6 = 40 / 6
    assert mse_loss(pred, torch.zeros_like(pred), lat_weights=lw).item() == pytest.approx(40 / 6)
    # The TV prior is not latitude-weighted.
    got = tv_regularised_loss(pred, torch.zeros_like(pred), lat_weights=lw).item()
    assert got == pytest.approx(40 / 6 + 0.02 * 4.6)


def test_loss_errors_are_clear():
    pred = torch.zeros(1, 2, 2, 3)
    with pytest.raises(ValueError, match="var_weights"):
        mse_loss(pred, pred, torch.ones(3))
    with pytest.raises(ValueError, match="lat_weights"):
        mse_loss(pred, pred, lat_weights=torch.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        mse_loss(pred, torch.zeros(1, 2, 3, 3))
    with pytest.raises(ValueError, match="radians|degrees"):
        latitude_weights(torch.tensor([0.0, 120.0]))
    with pytest.raises(ValueError, match="H, W >= 2"):
        tv_regularised_loss(torch.zeros(1, 1, 1, 3), torch.zeros(1, 1, 1, 3))


# ---------------------------------------------------------------- activation checkpointing


def test_activation_checkpointing_identical_outputs_and_grads():
    torch.manual_seed(0)
    cfg = tiny_cfg(dropout=0.1)  # dropout: the recomputation must replay the same masks
    ref = Reslim(cfg).double()
    ac = copy.deepcopy(ref)
    keys = list(ac.state_dict())
    assert apply_activation_checkpointing(ac) == cfg.depth
    assert apply_activation_checkpointing(ac) == cfg.depth  # idempotent
    assert all(is_checkpointed(b) and isinstance(b, Block) for b in ac.blocks)
    assert list(ac.state_dict()) == keys  # parameter names unchanged

    calls = []
    ac.blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    x, s = inputs(cfg)
    outs = []
    for model in (ref, ac):
        torch.manual_seed(123)
        y = model(x, s, 25.0)
        y.square().mean().backward()
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for (name, p_ref), p_ac in zip(ref.named_parameters(), ac.parameters(), strict=True):
        torch.testing.assert_close(p_ref.grad, p_ac.grad, rtol=0, atol=0, msg=name)
    assert len(calls) == 2  # forward + recomputation in backward: checkpointing is active


def test_activation_checkpointing_rejects_model_without_blocks():
    with pytest.raises(ValueError, match="block_types"):
        apply_activation_checkpointing(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- baseline


def test_baseline_runs_on_mag_squared_more_tokens():
    cfg = tiny_cfg()
    seen = {}
    reslim, base = Reslim(cfg).double(), UpsampleViT(cfg).double()
    reslim.blocks[0].register_forward_hook(lambda m, a, o: seen.__setitem__("reslim", o.shape[1]))
    base.blocks[0].register_forward_hook(lambda m, a, o: seen.__setitem__("base", o.shape[1]))
    x, s = inputs(cfg)
    assert reslim(x, s, 25.0).shape == base(x, s, 25.0).shape
    assert seen["base"] == cfg.mag**2 * seen["reslim"] == 16 * (8 // 2) * (12 // 2)


# ---------------------------------------------------------------- presets


def test_presets_parameter_counts_near_names():
    rows = []
    for name in PRESETS:
        with torch.device("meta"):  # no memory even for 10B
            model = build_model(name, ["t2m", "tp"], ["t2m", "tp"], STATICS)
        n = count_parameters(model)
        nominal = {"9.5M": 9.5e6, "126M": 126e6, "1B": 1e9, "10B": 10e9}.get(name)
        rows.append((name, n, nominal))
        if nominal is not None:
            assert abs(n - nominal) / nominal < 0.45, (name, n)
    print("\npreset   parameters        nominal  ratio")
    for name, n, nominal in rows:
        ratio = f"{n / nominal:.2f}" if nominal else "-"
        print(f"{name:6s} {n:14,d} {nominal or 0:14,.0f}  {ratio}")
    assert PRESETS["1B"]["embed_dim"] == 3072 and PRESETS["10B"]["depth"] == 11


def test_tiny_preset_builds_and_overrides_apply():
    model = build_model("tiny", ["t2m", "tp"], ["tp"], ["orog"], mag=2)
    assert isinstance(model, Reslim) and model.cfg.mag == 2 and model.cfg.embed_dim == 64
    x = torch.randn(1, 2, 4, 6)
    assert model(x, torch.randn(1, 1, 8, 12), 100.0).shape == (1, 1, 8, 12)


# ---------------------------------------------------------------- outputs that are not inputs


@pytest.mark.parametrize("cls", ["Reslim", "UpsampleViT"])
def test_output_that_is_not_an_input_has_a_zero_skip(cls):
    """Many inputs -> few outputs: an output absent from the inputs starts from zero (its
    normalised train mean) while a shared one starts from the upsampled input."""
    import downscaler.model as m

    torch.manual_seed(0)
    cfg = tiny_cfg(in_vars=["u10", "t2m", "z500"], out_vars=["t2m", "tp"])
    model = getattr(m, cls)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = torch.randn(2, 3, 4, 8)
    static = torch.randn(2, len(cfg.static_vars), 4 * cfg.mag, 8 * cfg.mag)
    out = model(x, static, 100.0)
    up = torch.nn.functional.interpolate(x[:, 1:2], scale_factor=cfg.mag, mode="bilinear",
                                         align_corners=False)
    torch.testing.assert_close(out[:, :1], up)
    assert torch.count_nonzero(out[:, 1]) == 0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(embed_dim=30, num_heads=4), "num_heads"),
        (dict(embed_dim=18, num_heads=3), "divisible by 4"),
        (dict(mag=0), "mag"),
        (dict(mag=2.5), "mag"),
        (dict(patch_size=0), "patch_size"),
        (dict(in_vars=["t2m", "t2m"]), "duplicate"),
        (dict(static_vars=["t2m"]), "static_vars"),
        (dict(in_vars="t2m"), "in_vars"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_config_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        tiny_cfg(**kw)


def test_bad_input_errors():
    cfg = tiny_cfg()
    model = Reslim(cfg).double()
    x, s = inputs(cfg)
    with pytest.raises(ValueError, match="patch_size"):
        model(x[..., :7, :], s[..., :28, :], 25.0)
    with pytest.raises(ValueError, match="static has 2 channels"):
        model(x, s[:, :2], 25.0)
    with pytest.raises(ValueError, match=r"fine grid"):
        model(x, s[..., :-4], 25.0)
    with pytest.raises(ValueError, match="in_vars"):
        model(x[:, :2], s, 25.0)
    with pytest.raises(ValueError, match="res_km"):
        model(x, s, torch.ones(3))
    with pytest.raises(ValueError, match="res_km"):
        model(x, s, -5.0)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge", ["t2m"], ["t2m"])
    with pytest.raises(ValueError, match="unknown model override"):
        build_model("tiny", ["t2m"], ["t2m"], embed=3)


def test_masked_loss_ignores_missing_targets():
    from downscaler.model.loss import mse_loss, tv_regularised_loss

    pred = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]])
    target = torch.tensor([[[[0.0, float("nan"), 3.0], [1.0, float("nan"), 6.0]]]])
    mask = ~torch.isnan(target)
    # valid errors: 1, 0, 9, 0 -> mean 2.5; the NaN pixels take no part
    assert mse_loss(pred, target, mask=mask).item() == pytest.approx(2.5)
    full = tv_regularised_loss(pred, target, tv_weight=0.1, mask=mask)
    assert torch.isfinite(full)
    assert full.item() == pytest.approx(2.5 + 0.1 * total_variation(pred).item())
    pred.requires_grad_(True)
    mse_loss(pred, target, mask=mask).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[0, 0, 0, 1] == 0
