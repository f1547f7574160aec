"""Config validation: defaults filled from the schema, bad keys and values named clearly."""

import copy

import pytest
import yaml
from downscaler.config import ConfigError, load_schema, validate_config

from tests.conftest import REPO

DEMO = yaml.safe_load((REPO / "config.yaml").read_text())


def test_demo_config_is_valid_and_defaults_are_filled():
    config = validate_config({})
    assert config["regrid"]["factor"] == 4 and config["tiles"]["halo"] == 2
    assert validate_config(DEMO)["variables"] == ["2m_temperature", "total_precipitation"]


def test_every_schema_key_has_a_description():
    def walk(node, key="(root)"):
        for name, sub in node.get("properties", {}).items():
            assert "description" in sub or "$ref" in sub, f"{key}.{name} has no description"
            walk(sub, f"{key}.{name}")

    walk(load_schema())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(trian={}), r"unknown key\(s\) \['trian'\]"),
        (lambda c: c["train"].update(epochs=0), r"train\.epochs: 0 is less than the minimum"),
        (lambda c: c["targets"].update(variables=["2m_temp"]),
         r"targets\.variables\.0: unknown variable '2m_temp'; valid choices: \["),
        (lambda c: c["period"].update(end="1999-01-01"), "period: end 1999-01-01 is before"),
        (lambda c: c["period"].update(start="2000-13-01"), "period.start"),
        (lambda c: c["split"]["test"].update(end="2003-01-01"), "split.test: .* not inside"),
        (lambda c: c["split"]["val"].update(start="2001-06-01"), "train and val overlap"),
        (lambda c: c["region"].update(south=50.0), "south must be less than north"),
        (lambda c: c["tiles"].update(div_lat=16), "tiles .*try div_lat in"),
        (lambda c: c["tiles"].update(div_lat=3), r"valid div_lat: \[1, 2, 4, 8, 16\]"),
        (lambda c: c["targets"].update(resolution=0.3), "not a multiple of targets.resolution"),
        (lambda c: c["model"].update(num_heads=3), "embed_dim 64 is not divisible by num_heads"),
        (lambda c: (c["model"].update(architecture="upsample_vit"),
                    c["parallel"].update(processes=2, tp=2, dchag="linear")),
         "parallel.dchag: D-CHAG splits Reslim's channel aggregation"),
    ],
)
def test_bad_config_is_rejected_naming_the_key(change, message):
    config = copy.deepcopy(DEMO)
    change(config)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


# -- the typed configuration (downscaler.settings): built from the schema's defaults only ------


def test_typed_settings_from_the_default_and_the_demo_config():
    from downscaler.settings import EnsembleConfig, InferenceInput, Settings

    default = Settings.from_validated(validate_config({}))
    assert default.tiles.memory_mb == 512 and default.regrid.scheduler == "threads"
    assert default.infer.ensemble == EnsembleConfig(mc_dropout=0, checkpoints=(), seed=0)
    assert default.train.betas == (0.9, 0.99) and default.parallel.tp == 1
    assert default.model.embed_dim is None  # an override the schema leaves unset
    demo = validate_config({**DEMO, "inference_inputs": {"gcm": {
        "source": "cmip6", "root": "/data", "source_id": "M", "experiment": "historical"}}})
    settings = Settings.from_validated(demo)
    assert settings.targets.variables == tuple(demo["targets"]["variables"])
    assert settings.split.test.start == demo["split"]["test"]["start"]
    gcm = settings.inference_inputs["gcm"]
    assert isinstance(gcm, InferenceInput) and gcm.member == "r1i1p1f1" and gcm.paths is None


def test_a_missing_key_is_named_and_not_defaulted():
    from downscaler.settings import Settings, typed

    config = validate_config({})
    del config["tiles"]["memory_mb"]
    with pytest.raises(ConfigError, match=r"\['tiles\.memory_mb'\].*validate_config"):
        typed(config, "tiles")
    config["tiles"]["memory_mb"] = 512
    del config["infer"]["ensemble"]["seed"]
    with pytest.raises(ConfigError, match=r"\['infer\.ensemble\.seed'\]"):
        Settings.from_validated(config)


def test_a_partial_section_is_completed_from_the_schema():
    from downscaler.settings import from_schema

    tiles = from_schema("tiles", {"div_lat": 3, "halo": 1})
    schema = load_schema()["properties"]["tiles"]["properties"]
    assert (tiles.div_lat, tiles.halo) == (3, 1)
    assert tiles.memory_mb == schema["memory_mb"]["default"]


def test_no_typed_section_declares_a_default():
    """The schema is the only source of defaults: a default here would be a second one."""
    import dataclasses

    from downscaler import settings, train_config

    classes = [c for m in (settings, train_config) for c in vars(m).values()
               if dataclasses.is_dataclass(c) and c.__module__ == m.__name__]
    assert len(classes) > 10
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and (
                f.default_factory is dataclasses.MISSING), f"{cls.__name__}.{f.name}"
