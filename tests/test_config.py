"""Config validation: every problem is one sentence naming the key."""

import pytest

import prunekit
from prunekit.config import ConfigError, load_config


def test_defaults_and_example_configs_load():
    cfg = load_config({})
    assert cfg.importance.method == "ipad" and cfg.targets.stop_when == "both"
    unet = load_config("configs/unet.yaml")
    assert unet.model.builder == "prunekit.zoo:unet" and unet.limits.layers["out"] == 0.0
    resnet = load_config("configs/resnet.yaml")
    assert resnet.limits.round_to == 8 and resnet.targets.params == 0.6


@pytest.mark.parametrize("raw, fragment", [
    ({"targets": {"flop": 0.5}}, "'targets.flop' does not exist; did you mean 'targets.flops'"),
    ({"limitz": {}}, "'limitz' does not exist; did you mean 'limits'"),
    ({"targets": {"flops": 1.5}}, "'targets.flops' must be a ratio in (0, 1]"),
    ({"targets": {"flops": 0}}, "'targets.flops' must be a ratio in (0, 1]"),
    ({"targets": {"params": "half"}}, "'targets.params' must be a number"),
    ({"targets": {"stop_when": "all"}}, "'targets.stop_when' must be 'both' or 'any'"),
    ({"limits": {"default": -0.1}}, "'limits.default' must be a fraction in [0, 1]"),
    ({"limits": {"layers": {"enc1.*": 2}}}, "'limits.layers.enc1.*' must be a fraction in [0, 1]"),
    ({"limits": {"round_to": 0}}, "'limits.round_to' must be an integer >= 1"),
    ({"schedule": {"steps": 2.5}}, "'schedule.steps' must be an integer"),
    ({"schedule": {"finetune": {"iterations": 10, "lr": -1}}}, "'schedule.finetune.lr' must be a positive number"),
    ({"importance": {"norm": 3}}, "'importance.norm' must be 1 or 2"),
    ({"model": {"trusted_pickle": "yes"}}, "'model.trusted_pickle' must be true or false"),
    ({"input_shape": [1, 0, 4]}, "'input_shape' must be a list of at least two positive integers"),
    ({"keep_best": 0}, "'keep_best' must be an integer >= 1"),
    ({"data": {"train": {"imgs": "x"}}}, "'data.train.imgs' does not exist; did you mean 'data.train.images'"),
])
def test_bad_configs_name_the_key(raw, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_problems(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("targets: {flops: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_config_object_is_checked_and_equal():
    cfg = prunekit.Config()
    assert load_config(cfg) == cfg


def test_a_config_built_in_code_is_checked_like_yaml():
    from prunekit.config import Config, Limits, Targets

    with pytest.raises(prunekit.PrunekitError, match="limits.default"):
        prunekit.load_config(Config(limits=Limits(default=2.0)))
    with pytest.raises(prunekit.PrunekitError, match="targets.flops"):
        prunekit.load_config(Config(targets=Targets(flops=0.0)))
    good = Config(limits=Limits(default=0.5, layers={"fc": 0}))
    assert prunekit.load_config(good) == good


def test_config_errors_carry_the_key_and_the_nearest_valid_one():
    with pytest.raises(prunekit.PrunekitError) as info:
        load_config({"targets": {"flop": 0.5}})
    assert info.value.key == "targets.flop" and info.value.suggestion == "targets.flops"
    with pytest.raises(prunekit.PrunekitError) as info:
        load_config({"limits": {"default": 3}})
    assert info.value.key == "limits.default"
