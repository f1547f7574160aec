"""A cost model of a training step, calibrated on the measured runs, for predicted curves.

    t(L, F) = a + b F + c L + d L^2

L: tokens of the transformer's sequence, F: fine-grid pixels per sample. ``a`` is the fixed cost
of a step (launches, optimizer, Python), ``b F`` the fine-grid work both models share (residual
convolutions, unpatchify, loss), ``c L`` the per-token work (QKV / MLP matmuls, ~24 L D^2 FLOPs a
block) and ``d L^2`` attention (~4 L^2 D FLOPs a block). The four coefficients are fitted by
non-negative least squares to every (model, magnification) case of one
bench_reslim_vs_baseline run: Reslim varies F at fixed L, the upsample-first ViT varies L and F
together, so the terms separate. Predictions are drawn dashed and labelled "predicted"; they
extrapolate this machine's costs, not a GPU's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import nnls

TERMS = ("fixed_s", "per_fine_pixel_s", "per_token_s", "per_token_pair_s")


def _design(tokens: np.ndarray, fine_pixels: np.ndarray) -> np.ndarray:
    tokens, fine_pixels = np.asarray(tokens, float), np.asarray(fine_pixels, float)
    return np.stack([np.ones_like(tokens), fine_pixels, tokens, tokens**2], axis=1)


def fit(cases: pd.DataFrame) -> dict[str, float]:
    """Coefficients from cases with columns tokens, fine (side in pixels), step_s.

    Rows are weighted by 1 / step_s, so the fit minimises relative error (the short Reslim
    steps count as much as the long ViT ones)."""
    design = _design(cases["tokens"], cases["fine"].astype(float) ** 2)
    weight = 1.0 / cases["step_s"].to_numpy(float)
    coef, _ = nnls(design * weight[:, None], cases["step_s"].to_numpy(float) * weight)
    return dict(zip(TERMS, coef.tolist(), strict=True))


def predict(coef: dict[str, float], tokens, fine_pixels) -> np.ndarray:
    return _design(np.atleast_1d(tokens), np.atleast_1d(fine_pixels)) @ np.array(
        [coef[t] for t in TERMS])


def speedup_curve(coef: dict[str, float], coarse: int, patch: int, mags) -> list[dict]:
    """Predicted upsample-ViT / Reslim step-time ratio at coarse side `coarse` per magnification."""
    out = []
    for mag in mags:
        fine = (coarse * mag) ** 2
        reslim = predict(coef, (coarse // patch) ** 2, fine)[0]
        vit = predict(coef, (coarse * mag // patch) ** 2, fine)[0]
        out.append({"coarse": coarse, "mag": int(mag), "predicted_speedup": vit / reslim})
    return out
