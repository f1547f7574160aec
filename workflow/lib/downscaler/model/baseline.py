"""UpsampleViT: the conventional (ClimaX / ClimateLearn) upsample-first downscaling ViT.

The coarse input is bilinearly upsampled to the fine grid FIRST, the fine statics are
concatenated, and the same transformer blocks as Reslim run on the fine grid, i.e. with mag^2
more tokens (quadratically more attention work). A linear head emits one ``p x p`` fine patch per
token. It takes the same ``ReslimConfig`` and forward signature as ``Reslim`` so speed and skill
can be compared side by side.

To isolate the one design choice being compared (where the transformer runs), everything else is
kept equal to Reslim: per-variable tokenisation + one-query aggregation, sin-cos positional and
resolution embeddings, the same blocks and decoder MLP, and the same bilinear skip with a
small-initialised last layer (so both start from interpolation skill). ``residual_channels`` is
unused: the baseline has no CNN branch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import (
    VariableTokenizer,
    make_head,
    reset_all_parameters,
    unpatchify,
)
from .reslim import (
    OUTPUT_INIT_SCALE,
    ReslimConfig,
    add_transformer,
    embed_tokens,
    validate_inputs,
)

__all__ = ["UpsampleViT"]


class UpsampleViT(nn.Module):
    """Upsample-first ViT baseline on the fine grid; same config and call as ``Reslim``."""

    def __init__(self, cfg: ReslimConfig) -> None:
        super().__init__()
        if not isinstance(cfg, ReslimConfig):
            raise TypeError(f"cfg must be a ReslimConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d, p = cfg.embed_dim, cfg.patch_size
        n_ch = len(cfg.in_vars) + len(cfg.static_vars)
        n_out = len(cfg.out_vars)
        self.out_index = cfg.out_index
        self.tokenizer = VariableTokenizer(n_ch, d, p)
        add_transformer(self, cfg)
        self.head = make_head(d, cfg.decoder_depth, n_out * p * p)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter; also usable after ``to_empty`` from the meta device."""
        reset_all_parameters(self)
        self.pos_scale.fill_(1.0)
        last = self.head[-1]
        last.weight.mul_(OUTPUT_INIT_SCALE)
        last.bias.zero_()

    def forward(self, x: Tensor, static: Tensor, res_km: float | Tensor) -> Tensor:
        """Downscale ``x [B, V, h, w]`` with fine ``static [B, S, mag*h, mag*w]``.

        ``res_km``: coarse grid spacing in km (scalar or ``[B]``). Returns
        ``[B, len(out_vars), mag*h, mag*w]``.
        """
        validate_inputs(self.cfg, x, static, fine_patch=True)
        _, _, h, w = x.shape
        mag, p, n_out = self.cfg.mag, self.cfg.patch_size, len(self.cfg.out_vars)
        hf, wf = h * mag, w * mag
        up = x if mag == 1 else F.interpolate(
            x, scale_factor=mag, mode="bilinear", align_corners=False
        )
        tokens = self.tokenizer(torch.cat([up, static.to(up.dtype)], dim=1))
        z = embed_tokens(self, tokens, hf // p, wf // p, res_km)
        for block in self.blocks:
            z = block(z)
        z = self.head(self.norm(z))
        skip = torch.cat([up[:, i:i + 1] if i >= 0 else torch.zeros_like(up[:, :1])
                          for i in self.out_index], dim=1)  # zero for an output not an input
        return skip + unpatchify(z, n_out, hf // p, wf // p, p)
