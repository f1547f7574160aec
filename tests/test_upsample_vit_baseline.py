"""The upsample-first ViT baseline (issue 16 section 4c): trained by the same training entry
point and rule as Reslim (model.architecture), inferred on the test period and scored."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from downscaler.infer import load_model
from downscaler.model import Reslim, UpsampleViT, build_model

from tests.conftest import REPO
from tests.test_evaluate import TINY_CONFIG


def test_build_model_architecture_switch():
    args = ("tiny", ["t2m"], ["t2m"], ["orog"])
    assert type(build_model(*args)) is Reslim
    vit = build_model(*args, architecture="upsample_vit", embed_dim=16)
    assert type(vit) is UpsampleViT and vit.cfg.embed_dim == 16
    with pytest.raises(ValueError, match="model.architecture"):
        build_model(*args, architecture="unet")


@pytest.mark.slow
def test_workflow_trains_and_scores_the_upsample_vit_baseline(tmp_path):
    config = TINY_CONFIG.replace("model: {preset: tiny}",
                                 "model: {preset: tiny, embed_dim: 16, depth: 1}")
    config += "evaluate: {baselines: [bicubic, upsample_vit]}\n"
    (tmp_path / "config.yaml").write_text(config)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    done = subprocess.run(
        [shutil.which("snakemake", path=env["PATH"]), "-s", str(REPO / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml"),
         "--cores", "2", "-q", "--", "results/evaluation/metrics.csv"],
        env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = tmp_path / "results"
    vit_dir = results / "model" / "baselines" / "upsample_vit"
    # trained by the training rule: its own curves and best checkpoint, the same budget
    assert pd.read_csv(vit_dir / "training_log.csv")["val_loss"].notna().any()
    model, payload = load_model(vit_dir / "checkpoint.pt", "upsample_vit")
    assert type(model) is UpsampleViT and payload["architecture"] == "upsample_vit"
    reslim = torch.load(results / "model" / "checkpoint.pt", weights_only=False)
    assert reslim["architecture"] == "reslim" and reslim["step"] == payload["step"]
    metrics = pd.read_csv(results / "evaluation" / "metrics.csv")
    rmse = metrics[metrics["metric"] == "rmse"].set_index(["method", "variable"])["value"]
    assert {"reslim", "upsample_vit", "bicubic"} <= set(metrics["method"])
    for name in ("t2m", "tp"):
        assert np.isfinite(rmse[("upsample_vit", name)])
        # a different model from Reslim, not a copy of its output
        assert rmse[("upsample_vit", name)] != rmse[("reslim", name)]
