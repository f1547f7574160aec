"""Reslim ("Residual Slim ViT", ORBIT-2): a downscaling ViT whose transformer runs coarse.

Pipeline (REFERENCE section 1), for coarse input ``x [B, V, h, w]`` and fine statics
``static [B, S, mag*h, mag*w]``:

1. per-variable tokenisation: coarse inputs with ``Conv2d(1->D, p, p)``; fine statics with
   ``Conv2d(1->D, p*mag, p*mag)``, which lands on the same ``L = (h/p)(w/p)`` tokens while keeping
   their sub-grid detail (ORBIT-2 feeds coarse statics; sub-grid orography is what makes fine
   temperature predictable);
2. a learned per-variable embedding, then cross-attention with one learned query -> ``[B, L, D]``;
3. fixed 2-D sin-cos positional embedding for the current token grid, times a learnable scalar
   ``pos_scale`` (a scalar rather than a learned table, so any tile size works with no
   interpolation), plus a resolution embedding ``Linear(1, D)(res_km / 100)``;
4. ``depth`` pre-norm transformer blocks and a final LayerNorm;
5. head: MLP to ``out_ch * (mag*p)^2`` per token, unpatchify to the fine grid, 3x3 conv;
6. residual CNN path on (coarse out_vars, pixel-unshuffled fine statics), PixelShuffle to fine.

Output = bilinear upsampling of the coarse out_vars + head + residual path. An output that is
not among the inputs (e.g. a target observed only at high resolution) has a zero skip (zero is
its normalised train mean) and a zero coarse channel in the residual path: the head and the
residual path, which see every input and static, predict it in full. The two learned
branches end in convolutions initialised ~100x smaller than default, so at step 0 the model is
(almost) bilinear interpolation and learns corrections to it, while every parameter still gets a
non-zero gradient (a fully zero-initialised output layer would make all upstream gradients zero,
which also makes parallel gradient-parity checks vacuous).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    Block,
    VariableAggregator,
    VariableTokenizer,
    check_heads,
    make_head,
    reset_all_parameters,
    sincos_pos_embed_2d,
    unpatchify,
)

__all__ = ["ReslimConfig", "Reslim", "ReslimTokenizer", "ResidualPath"]

# Scale applied to the default init of the last layer of each learned branch (see module doc).
OUTPUT_INIT_SCALE = 0.01


def _check_names(arg: str, names: object, *, allow_empty: bool) -> list[str]:
    """Validate a list of unique variable short names; return it as a list."""
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(
            f"{arg} must be a list of variable short names, e.g. ['t2m'], got {names!r}"
        )
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{arg} must contain non-empty strings, got {names!r}")
    if not names and not allow_empty:
        raise ValueError(f"{arg} is empty; give at least one variable short name")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise ValueError(f"{arg} has duplicate names {dupes}; list each variable once")
    return list(names)


def _check_int(arg: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}")


@dataclass
class ReslimConfig:
    """Architecture of Reslim (and of the UpsampleViT baseline, which shares it).

    Variables are addressed by short name: ``out_vars`` are the predicted variables, usually
    some of ``in_vars`` (many inputs -> few outputs) but not necessarily; ``static_vars`` are
    fine-grid fields (orography, land-sea mask,
    latitude, ...). Validated on construction.
    """

    in_vars: list[str]
    out_vars: list[str]
    static_vars: list[str] = field(default_factory=list)
    mag: int = 4
    patch_size: int = 2
    embed_dim: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    decoder_depth: int = 2
    residual_channels: int = 32
    dropout: float = 0.0

    def __post_init__(self) -> None:
        self.in_vars = _check_names("in_vars", self.in_vars, allow_empty=False)
        self.out_vars = _check_names("out_vars", self.out_vars, allow_empty=False)
        self.static_vars = _check_names("static_vars", self.static_vars, allow_empty=True)
        clash = [v for v in self.static_vars if v in self.in_vars]
        if clash:
            raise ValueError(
                f"static_vars {clash} also appear in in_vars; a name must be either a coarse "
                "input or a fine static field, not both"
            )
        _check_int("mag", self.mag, 1)
        _check_int("patch_size", self.patch_size, 1)
        _check_int("embed_dim", self.embed_dim, 4)
        _check_int("depth", self.depth, 1)
        _check_int("num_heads", self.num_heads, 1)
        _check_int("decoder_depth", self.decoder_depth, 0)
        _check_int("residual_channels", self.residual_channels, 1)
        check_heads(self.embed_dim, self.num_heads)
        if self.embed_dim % 4 != 0:
            raise ValueError(
                f"embed_dim={self.embed_dim} must be divisible by 4 (2-D sin-cos positional "
                "embedding); choose e.g. 64, 256 or 1024"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def out_index(self) -> list[int]:
        """Positions of ``out_vars`` among ``in_vars`` (channel indices into ``x``); -1 for an
        output that is not an input (its skip connection is zero)."""
        return [self.in_vars.index(v) if v in self.in_vars else -1 for v in self.out_vars]


def validate_inputs(
    cfg: ReslimConfig, x: Tensor, static: Tensor, *, fine_patch: bool = False
) -> None:
    """Check ``x`` and ``static`` shapes against ``cfg`` with messages naming the fix.

    ``fine_patch``: the patch grid lives on the fine grid (baseline) instead of the coarse one.
    """
    if x.ndim != 4:
        raise ValueError(f"x must be [B, len(in_vars), h, w], got shape {tuple(x.shape)}")
    b, v, h, w = x.shape
    if v != len(cfg.in_vars):
        raise ValueError(
            f"x has {v} channels but in_vars has {len(cfg.in_vars)} ({cfg.in_vars}); "
            "stack the coarse inputs in in_vars order"
        )
    p, mag = cfg.patch_size, cfg.mag
    gh, gw = (h * mag, w * mag) if fine_patch else (h, w)
    if gh % p or gw % p:
        grid = "fine" if fine_patch else "coarse"
        raise ValueError(
            f"{grid} tile {gh}x{gw} is not divisible by patch_size={p}; crop or pad the tile "
            f"to a multiple of {p}"
        )
    if static.ndim != 4:
        raise ValueError(
            f"static must be [B, len(static_vars), mag*h, mag*w], got shape {tuple(static.shape)}"
        )
    if static.shape[1] != len(cfg.static_vars):
        raise ValueError(
            f"static has {static.shape[1]} channels but static_vars has "
            f"{len(cfg.static_vars)} ({cfg.static_vars}); stack the statics in static_vars order"
        )
    if static.shape[0] != b:
        raise ValueError(f"static batch size {static.shape[0]} != x batch size {b}")
    if tuple(static.shape[2:]) != (mag * h, mag * w):
        raise ValueError(
            f"static is {tuple(static.shape[2:])} but must be the fine grid "
            f"(mag*h, mag*w) = ({mag * h}, {mag * w}) for x of {h}x{w} and mag={mag}"
        )


def resolution_tensor(res_km: float | Tensor, batch: int, ref: Tensor) -> Tensor:
    """``res_km`` (scalar or ``[B]``) as a ``[B, 1]`` tensor of ``res_km / 100`` like ``ref``."""
    if not isinstance(res_km, Tensor):
        if isinstance(res_km, bool) or not isinstance(res_km, (int, float)) or not res_km > 0:
            raise ValueError(f"res_km must be a positive grid spacing in km, got {res_km!r}")
    r = torch.as_tensor(res_km, device=ref.device, dtype=ref.dtype)
    if r.ndim == 0:
        r = r.expand(batch)
    if r.shape != (batch,):
        raise ValueError(f"res_km must be a scalar or shape [{batch}], got {tuple(r.shape)}")
    return (r / 100.0).reshape(batch, 1)


class ReslimTokenizer(nn.Module):
    """Per-variable tokens for coarse inputs and fine statics on one shared token grid.

    ``forward(x [B, V, h, w], static [B, S, mag*h, mag*w]) -> [B, V+S, L, D]``. Coarse inputs use
    kernel ``p``; fine statics kernel ``p*mag`` so both give ``L = (h/p)(w/p)`` tokens.
    """

    def __init__(self, n_in: int, n_static: int, dim: int, patch: int, mag: int) -> None:
        super().__init__()
        self.inputs = VariableTokenizer(n_in, dim, patch)
        self.statics = VariableTokenizer(n_static, dim, patch * mag) if n_static else None

    def forward(self, x: Tensor, static: Tensor) -> Tensor:
        """Tokenise ``x`` and ``static``; statics become extra variables after the inputs."""
        tokens = self.inputs(x)
        if self.statics is not None:
            tokens = torch.cat([tokens, self.statics(static)], dim=1)
        return tokens


class ResidualPath(nn.Module):
    """Lean CNN branch: (coarse out_vars, pixel-unshuffled statics) -> fine-grid correction.

    Conv3x3 -> GELU -> Conv3x3 to ``channels * mag^2`` -> PixelShuffle(mag) -> Conv3x3 to
    ``n_out``. Pixel-unshuffling the statics hands the coarse-grid convs every fine static pixel.
    """

    def __init__(self, n_out: int, n_static: int, mag: int, channels: int) -> None:
        super().__init__()
        self.mag = mag
        self.conv_in = nn.Conv2d(n_out + n_static * mag * mag, channels, 3, padding=1)
        self.act = nn.GELU()
        self.conv_up = nn.Conv2d(channels, channels * mag * mag, 3, padding=1)
        self.shuffle = nn.PixelShuffle(mag)
        self.conv_out = nn.Conv2d(channels, n_out, 3, padding=1)

    def forward(self, x_out: Tensor, static: Tensor) -> Tensor:
        """``x_out [B, O, h, w]``, ``static [B, S, mag*h, mag*w]`` -> ``[B, O, mag*h, mag*w]``."""
        feats = x_out
        if static.shape[1]:  # pixel_unshuffle mis-shapes a zero-channel tensor
            feats = torch.cat([x_out, F.pixel_unshuffle(static, self.mag)], dim=1)
        y = self.conv_up(self.act(self.conv_in(feats)))
        return self.conv_out(self.shuffle(y))


def add_transformer(model: nn.Module, cfg: ReslimConfig) -> None:
    """Give ``model`` the parts between its tokenizer and its head, the same in Reslim and the
    upsample-first ViT: channel aggregation, position and resolution embeddings, the blocks and
    the final norm (registered in this order, so parameter order and initialisation match)."""
    d = cfg.embed_dim
    model.aggregator = VariableAggregator(d, cfg.num_heads)
    model.pos_scale = nn.Parameter(torch.ones(()))
    model.res_embed = nn.Linear(1, d)
    model.pos_drop = nn.Dropout(cfg.dropout)
    model.blocks = nn.ModuleList(
        Block(d, cfg.num_heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
    )
    model.norm = nn.LayerNorm(d)


def embed_tokens(model: nn.Module, tokens: Tensor, grid_h: int, grid_w: int,
                 res_km: float | Tensor) -> Tensor:
    """Per-variable tokens -> one token per location, plus the sin-cos position and resolution
    embeddings: the step before the transformer blocks, shared by Reslim, its first pipeline
    stage and the upsample-first ViT (each holds ``aggregator``, ``pos_scale``, ``res_embed``,
    ``pos_drop``)."""
    z = model.aggregator(tokens)
    pos = sincos_pos_embed_2d(z.shape[-1], grid_h, grid_w, device=z.device, dtype=z.dtype)
    res = model.res_embed(resolution_tensor(res_km, z.shape[0], model.res_embed.weight))
    return model.pos_drop(z + model.pos_scale * pos + res[:, None, :])


class Reslim(nn.Module):
    """ORBIT-2's Reslim: coarse-grid ViT + fine-grid head + residual CNN, on a bilinear skip.

    A plain ``nn.Module``: parallelism (TP on ``blocks[i].attn.qkv/proj`` and
    ``blocks[i].mlp.fc1/fc2``, D-CHAG on ``tokenizer`` + ``aggregator``, FSDP, activation
    checkpointing) is applied from outside.
    """

    def __init__(self, cfg: ReslimConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ReslimConfig):
            raise TypeError(f"cfg must be a ReslimConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d, p, mag = cfg.embed_dim, cfg.patch_size, cfg.mag
        n_in, n_out, n_st = len(cfg.in_vars), len(cfg.out_vars), len(cfg.static_vars)
        self.out_index = cfg.out_index
        self.tokenizer = ReslimTokenizer(n_in, n_st, d, p, mag)
        add_transformer(self, cfg)
        self.head = make_head(d, cfg.decoder_depth, n_out * (mag * p) ** 2)
        self.head_conv = nn.Conv2d(n_out, n_out, 3, padding=1)
        self.residual = ResidualPath(n_out, n_st, mag, cfg.residual_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter; also usable after ``to_empty`` from the meta device."""
        reset_all_parameters(self)
        self.pos_scale.fill_(1.0)
        for conv in (self.head_conv, self.residual.conv_out):
            conv.weight.mul_(OUTPUT_INIT_SCALE)
            conv.bias.mul_(OUTPUT_INIT_SCALE)

    def coarse_outputs(self, x: Tensor) -> Tensor:
        """The coarse ``out_vars`` from ``x``; zeros (the normalised train mean) for an output
        that is not an input, which the learned branches then predict in full."""
        if min(self.out_index) >= 0:
            return x[:, self.out_index]
        zeros = x.new_zeros(x.shape[0], 1, *x.shape[2:])
        return torch.cat([x[:, i:i + 1] if i >= 0 else zeros for i in self.out_index], dim=1)

    def upsample_skip(self, x: Tensor) -> Tensor:
        """Bilinear upsampling of the coarse ``out_vars``: the baseline the model corrects."""
        x_out = self.coarse_outputs(x)
        if self.cfg.mag == 1:
            return x_out
        return F.interpolate(x_out, scale_factor=self.cfg.mag, mode="bilinear", align_corners=False)

    def forward_tokens(self, x: Tensor, static: Tensor, res_km: float | Tensor) -> Tensor:
        """Tokenise, aggregate, embed, run the transformer: ``[B, L, D]`` after the final norm."""
        p = self.cfg.patch_size
        z = embed_tokens(self, self.tokenizer(x, static), x.shape[-2] // p, x.shape[-1] // p,
                         res_km)
        for block in self.blocks:
            z = block(z)
        return self.norm(z)

    def forward(self, x: Tensor, static: Tensor, res_km: float | Tensor) -> Tensor:
        """Downscale ``x [B, V, h, w]`` with fine ``static [B, S, mag*h, mag*w]``.

        ``res_km``: coarse grid spacing in km (scalar or ``[B]``). Returns
        ``[B, len(out_vars), mag*h, mag*w]`` in the normalised units of ``x``.
        """
        validate_inputs(self.cfg, x, static)
        static = static.to(x.dtype)  # statics are often stored in another precision
        _, _, h, w = x.shape
        p, mag, n_out = self.cfg.patch_size, self.cfg.mag, len(self.cfg.out_vars)
        z = self.head(self.forward_tokens(x, static, res_km))
        y = self.head_conv(unpatchify(z, n_out, h // p, w // p, mag * p))
        skip = self.upsample_skip(x)
        resid = self.residual(self.coarse_outputs(x), static)
        return skip + y + resid
