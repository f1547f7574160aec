"""Training losses: (latitude- and variable-) weighted MSE and ORBIT-2's TV-regularised loss.

Tensors are ``[..., C, H, W]`` (typically ``[B, C, H, W]``): C output variables, H latitude rows,
W longitude columns. Variable weights are relative: the loss is a weighted AVERAGE over
variables, so with equal weights it equals the plain mean, whatever the weights' scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["latitude_weights", "mse_loss", "total_variation", "tv_regularised_loss"]

# Weight of the diagonal differences in the TV prior (ORBIT-2): they span sqrt(2) grid steps.
DIAGONAL_WEIGHT = 0.7


def latitude_weights(lat_deg: Tensor) -> Tensor:
    """``cos(latitude)`` normalised to mean 1, one weight per grid row (area weighting).

    ``lat_deg``: 1-D latitudes in degrees. Rows near the poles cover less area and count less.
    """
    lat = torch.as_tensor(lat_deg)
    if lat.ndim != 1 or lat.numel() == 0:
        raise ValueError(f"lat_deg must be a non-empty 1-D tensor of latitudes, got {lat.shape}")
    if not lat.is_floating_point():
        lat = lat.to(torch.get_default_dtype())
    if bool(((lat < -90) | (lat > 90)).any()):
        raise ValueError("lat_deg must be in degrees within [-90, 90]; were radians passed?")
    w = torch.cos(lat * (math.pi / 180.0)).clamp_min(0.0)
    mean = w.mean()
    if not mean > 0:
        raise ValueError("lat_deg are all at the poles: cos(latitude) weights sum to zero")
    return w / mean


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    if pred.ndim < 3:
        raise ValueError(f"pred must be [..., C, H, W], got shape {tuple(pred.shape)}")


def _var_average(per_var: Tensor, var_weights: Tensor | None) -> Tensor:
    """Weighted average of a ``[C]`` vector of per-variable losses."""
    if var_weights is None:
        return per_var.mean()
    w = torch.as_tensor(var_weights, dtype=per_var.dtype, device=per_var.device)
    if w.shape != per_var.shape:
        raise ValueError(
            f"var_weights has shape {tuple(w.shape)} but there are {per_var.numel()} output "
            "variables; give one weight per output variable, in out_vars order"
        )
    if bool((w < 0).any()) or not w.sum() > 0:
        raise ValueError("var_weights must be >= 0 with a positive sum")
    return (w * per_var).sum() / w.sum()


def _per_variable_mse(pred: Tensor, target: Tensor, lat_weights: Tensor | None,
                      mask: Tensor | None = None) -> Tensor:
    """Mean squared error per variable ``[C]``, rows weighted by ``lat_weights`` if given.

    ``mask`` (bool, shaped like ``target``, True = valid) leaves out missing targets (NaN over
    the sea in land-only data): the mean runs over the valid pixels only.
    """
    if mask is not None:
        err = torch.where(mask, pred - torch.nan_to_num(target), 0.0).square()
        weight = mask.to(err.dtype)
    else:
        err, weight = (pred - target).square(), torch.ones_like(pred)
    if lat_weights is not None:
        lw = torch.as_tensor(lat_weights, dtype=err.dtype, device=err.device)
        if lw.shape != (pred.shape[-2],):
            raise ValueError(
                f"lat_weights has shape {tuple(lw.shape)} but pred has {pred.shape[-2]} rows; "
                "give one weight per latitude row (see latitude_weights)"
            )
        err, weight = err * lw[:, None], weight * lw[:, None]
    c = pred.shape[-3]

    def per_var(t: Tensor) -> Tensor:
        return t.movedim(-3, 0).reshape(c, -1).sum(dim=1)

    return per_var(err) / per_var(weight).clamp_min(torch.finfo(err.dtype).tiny)


def mse_loss(
    pred: Tensor,
    target: Tensor,
    var_weights: Tensor | None = None,
    lat_weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Weighted mean squared error: per-variable (latitude-weighted) MSE, averaged over variables.

    ``var_weights [C]``: relative importance per output variable; ``lat_weights [H]``: per-row
    weights (mean 1, e.g. from ``latitude_weights``).
    """
    _check_pair(pred, target)
    return _var_average(_per_variable_mse(pred, target, lat_weights, mask), var_weights)


def total_variation(pred: Tensor) -> Tensor:
    """Anisotropic TV per variable ``[C]``: mean|dy| + mean|dx| + 0.7(mean|diag| + mean|anti|).

    Each mean runs over all leading dimensions and the pixels where that difference exists.
    """
    if pred.ndim < 3 or pred.shape[-1] < 2 or pred.shape[-2] < 2:
        raise ValueError(
            f"total variation needs [..., C, H, W] with H, W >= 2, got {tuple(pred.shape)}"
        )
    c = pred.shape[-3]

    def per_var_mean_abs(d: Tensor) -> Tensor:
        return d.abs().movedim(-3, 0).reshape(c, -1).mean(dim=1)

    dy = pred[..., 1:, :] - pred[..., :-1, :]
    dx = pred[..., :, 1:] - pred[..., :, :-1]
    diag = pred[..., 1:, 1:] - pred[..., :-1, :-1]
    anti = pred[..., 1:, :-1] - pred[..., :-1, 1:]
    return (
        per_var_mean_abs(dy)
        + per_var_mean_abs(dx)
        + DIAGONAL_WEIGHT * (per_var_mean_abs(diag) + per_var_mean_abs(anti))
    )


def tv_regularised_loss(
    pred: Tensor,
    target: Tensor,
    var_weights: Tensor | None = None,
    tv_weight: float = 0.02,
    lat_weights: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """ORBIT-2's "Bayesian" loss: MSE likelihood + ``tv_weight`` x total-variation prior on pred.

    Per variable ``c``: ``mse_c + tv_weight * tv_c`` (see ``total_variation``), then the
    ``var_weights`` average over variables. ``lat_weights`` weight the MSE rows only: the TV
    differences straddle rows and are a smoothness prior, not an area-weighted error.
    """
    _check_pair(pred, target)
    if not tv_weight >= 0:
        raise ValueError(f"tv_weight must be >= 0, got {tv_weight!r}")
    per_var = _per_variable_mse(pred, target, lat_weights, mask) + tv_weight * total_variation(pred)
    return _var_average(per_var, var_weights)
