"""Transformer pieces shared by Reslim and the upsample-first baseline.

Every layer here is a plain ``nn.Module`` that knows nothing of parallelism. The names are chosen
so that tensor / sequence / D-CHAG parallelism can be applied from outside (torchtitan style):

- ``Attention.qkv`` / ``Attention.proj`` and ``Mlp.fc1`` / ``Mlp.fc2`` are plain ``nn.Linear``
  layers (column-parallel: ``qkv``, ``fc1``; row-parallel: ``proj``, ``fc2``).
- ``n_heads`` is an attribute read at forward time, so a tensor-parallel plan can divide it by
  the TP degree after sharding ``qkv``.
- ``qkv`` packs its output features head-major, ``[n_heads, 3, head_dim]``, so a contiguous
  column shard holds the complete q, k and v of whole heads (Megatron's layout).
- The per-variable tokenizer and the variable aggregation are separate submodules, so D-CHAG can
  replace them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "Block",
    "Mlp",
    "VariableAggregator",
    "VariableTokenizer",
    "check_heads",
    "init_weights",
    "make_head",
    "reset_all_parameters",
    "sincos_pos_embed_2d",
    "unpatchify",
]


def init_weights(module: nn.Module) -> None:
    """ViT-style initialisation (truncated normal 0.02 for Linear, zero bias, unit LayerNorm).

    Applied with ``model.apply``; convolutions keep PyTorch's default (fan-in scaled) init.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def sincos_pos_embed_2d(
    embed_dim: int,
    grid_h: int,
    grid_w: int,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Fixed 2-D sine-cosine positional embedding ``[grid_h * grid_w, embed_dim]`` (row-major).

    Computed for whatever grid the input has, so any tile size works without interpolating a
    learned table. Half the channels encode the row, half the column (as in MAE / ClimaX).
    """
    if embed_dim % 4 != 0:
        raise ValueError(
            f"embed_dim={embed_dim}: the 2-D sin-cos positional embedding needs embed_dim "
            "divisible by 4; choose e.g. 64, 256 or 1024"
        )
    quarter = embed_dim // 4
    # Build in float64 then cast: the frequencies span 4 decades and bf16 would collapse them.
    omega = torch.arange(quarter, device=device, dtype=torch.float64) / quarter
    omega = 1.0 / (10000.0**omega)
    rows = torch.arange(grid_h, device=device, dtype=torch.float64)
    cols = torch.arange(grid_w, device=device, dtype=torch.float64)
    gy, gx = torch.meshgrid(rows, cols, indexing="ij")
    out_y = gy.reshape(-1, 1) * omega.reshape(1, -1)
    out_x = gx.reshape(-1, 1) * omega.reshape(1, -1)
    emb = torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)
    return emb.to(dtype)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    ``n_heads`` is read at forward time (a TP plan divides it); the head size is inferred from
    the (possibly sharded) ``qkv`` output.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        check_heads(dim, num_heads)
        self.n_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, L, D] -> [B, L, D]``."""
        b, n, _ = x.shape
        # Head-major packing: [B, L, n_heads, 3, head_dim] -> 3 x [B, n_heads, L, head_dim].
        qkv = self.qkv(x).reshape(b, n, self.n_heads, 3, -1).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)
        drop = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Two-layer GELU MLP: ``fc1`` (expand) -> GELU -> ``fc2`` (project back)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., D] -> [..., D]``."""
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(round(dim * mlp_ratio)), dropout)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, L, D] -> [B, L, D]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VariableTokenizer(nn.Module):
    """One ``Conv2d(1 -> D, kernel=k, stride=k)`` per channel plus a learned channel embedding.

    ``forward(fields [B, C, H, W]) -> [B, C, L, D]`` with ``L = (H/k)(W/k)``. Each channel has
    its own weights (the ClimaX / ORBIT-2 per-variable tokenisation), so channel ``c`` is
    ``embeds[c]`` and D-CHAG can give each rank only its own channels.
    """

    def __init__(self, n_channels: int, dim: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.embeds = nn.ModuleList(
            nn.Conv2d(1, dim, kernel_size=kernel, stride=kernel) for _ in range(n_channels)
        )
        self.channel_embed = nn.Parameter(torch.empty(n_channels, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the channel embedding (the convolutions reset themselves)."""
        nn.init.trunc_normal_(self.channel_embed, std=0.02)

    def forward(self, fields: Tensor) -> Tensor:
        """Tokenise every channel of ``fields [B, C, H, W]`` into ``[B, C, L, D]``."""
        if fields.shape[1] != len(self.embeds):
            raise ValueError(
                f"tokenizer expects {len(self.embeds)} channels, got {fields.shape[1]}"
            )
        tokens = [
            conv(fields[:, i : i + 1]).flatten(2).transpose(1, 2)
            for i, conv in enumerate(self.embeds)
        ]
        out = torch.stack(tokens, dim=1)
        return out + self.channel_embed[None, :, None, :].to(out.dtype)


class VariableAggregator(nn.Module):
    """Cross-attention with ONE learned query that merges the C channel tokens at each location.

    ``forward(tokens [B, C, L, D]) -> [B, L, D]``. This is the ClimaX / ORBIT-2 variable
    aggregation; D-CHAG replaces it with a distributed version. ``n_heads`` is read at forward.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        check_heads(dim, num_heads)
        self.n_heads = num_heads
        self.query = nn.Parameter(torch.empty(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the learned query (the Linear layers reset themselves)."""
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """Aggregate ``tokens [B, C, L, D]`` over C into ``[B, L, D]``."""
        b, c, n, d = tokens.shape
        seq = tokens.permute(0, 2, 1, 3).reshape(b * n, c, d)  # one short sequence per location
        h = self.n_heads
        q = self.q(self.query.to(seq.dtype)).reshape(1, 1, h, -1).transpose(1, 2)
        q = q.expand(b * n, -1, -1, -1)
        kv = self.kv(seq).reshape(b * n, c, h, 2, -1).permute(3, 0, 2, 1, 4)
        k, v = kv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [B*L, h, 1, hd]
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj(out)


def check_heads(dim: int, num_heads: int) -> None:
    """Raise a clear error unless ``num_heads`` is positive and divides ``dim``."""
    if num_heads < 1 or dim % num_heads != 0:
        raise ValueError(
            f"embed_dim={dim} is not divisible by num_heads={num_heads}; "
            "pick num_heads >= 1 that divides embed_dim"
        )


def make_head(dim: int, decoder_depth: int, out_features: int) -> nn.Sequential:
    """``decoder_depth`` x (Linear(D, D) + GELU), then Linear(D, out_features)."""
    layers: list[nn.Module] = []
    for _ in range(decoder_depth):
        layers += [nn.Linear(dim, dim), nn.GELU()]
    layers.append(nn.Linear(dim, out_features))
    return nn.Sequential(*layers)


def unpatchify(tokens: Tensor, channels: int, grid_h: int, grid_w: int, patch: int) -> Tensor:
    """Turn per-token patches ``[B, gh*gw, patch*patch*channels]`` into ``[B, C, gh*P, gw*P]``.

    Each token's features are read as ``(patch_row, patch_col, channel)``.
    """
    b = tokens.shape[0]
    x = tokens.reshape(b, grid_h, grid_w, patch, patch, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, gh, P, gw, P]
    return x.reshape(b, channels, grid_h * patch, grid_w * patch)


def reset_all_parameters(model: nn.Module) -> None:
    """Re-run every submodule's own initialisation, then the ViT init for Linear / LayerNorm.

    Lets a model built on the meta device (``torch.device("meta")``) be materialised with
    ``to_empty`` and then initialised exactly as a normally built one.
    """
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    model.apply(init_weights)
