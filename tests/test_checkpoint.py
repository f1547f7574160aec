"""downscaler.checkpoint itself: the inference checkpoint's round trip, atomic writes, the hash
recorded downstream, and clear errors for a file that is not a checkpoint."""

import hashlib

import pytest
import torch
from downscaler import checkpoint as ckpt
from downscaler.model.presets import build_model


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("tiny", ["t2m", "tp"], ["t2m"], ["orog"], embed_dim=16, num_heads=2,
                       depth=1, mag=2)


def _inputs(model):
    torch.manual_seed(1)
    x = torch.randn(2, 2, 8, 8)
    static = torch.randn(2, 1, 16, 16)
    return x, static, 100.0


def test_round_trip_rebuilds_the_same_function_and_keeps_the_metadata(tmp_path):
    model = _model().eval()
    stats = {"t2m": {"transform": "none", "mean": 280.0, "std": 10.0}}
    ckpt.save_checkpoint(tmp_path / "m.pt", model, variables=["t2m"], stats=stats, step=12)
    loaded, payload = ckpt.load_checkpoint(tmp_path / "m.pt")
    assert not loaded.training
    assert payload["variables"] == ["t2m"] and payload["stats"] == stats and payload["step"] == 12
    assert payload["model_config"]["in_vars"] == ["t2m", "tp"]
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(*_inputs(model)), model(*_inputs(model)), rtol=0,
                                   atol=0)


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "m.pt"
    ckpt.save_checkpoint(path, _model(0), step=1)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda fails inside torch.save)
        ckpt.save_checkpoint(path, _model(1), step=2, broken=lambda: None)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left


def test_sha256_names_the_exact_weights(tmp_path):
    ckpt.save_checkpoint(tmp_path / "a.pt", _model(0))
    ckpt.save_checkpoint(tmp_path / "b.pt", _model(1))
    digest = ckpt.file_sha256(tmp_path / "a.pt")
    assert digest == hashlib.sha256((tmp_path / "a.pt").read_bytes()).hexdigest()
    assert digest != ckpt.file_sha256(tmp_path / "b.pt")


def test_a_damaged_or_missing_file_is_a_clear_error(tmp_path):
    ckpt.save_checkpoint(tmp_path / "m.pt", _model())
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((tmp_path / "m.pt").read_bytes()[:200])
    for path in (damaged, tmp_path / "missing.pt"):
        with pytest.raises(RuntimeError, match=f"cannot read checkpoint {path}"):
            ckpt.load_checkpoint(path)


def test_the_recorded_architecture_is_rebuilt_and_a_mismatch_named(tmp_path):
    from downscaler.model.baseline import UpsampleViT

    model = build_model("tiny", ["t2m"], ["t2m"], ["orog"], embed_dim=16, num_heads=2, depth=1,
                        mag=2, architecture="upsample_vit")
    path = tmp_path / "vit.pt"
    ckpt.save_checkpoint(path, model, architecture="upsample_vit")
    loaded, payload = ckpt.load_checkpoint(path)
    assert isinstance(loaded, UpsampleViT) and payload["architecture"] == "upsample_vit"
    with pytest.raises(ValueError, match="holds a upsample_vit model, not reslim"):
        ckpt.load_checkpoint(path, "reslim")
