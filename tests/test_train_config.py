"""Training configuration: presets, config files, precedence and validation."""

from __future__ import annotations

import json

import pytest

from seal_train.config import PRESETS, ConfigError, TrainConfig, read_config_file, resolve_config


def test_precedence_preset_file_flags(tmp_path):
    path = tmp_path / "options.json"
    path.write_text(json.dumps({"preset": "tiny-imagenet-resnet18", "epochs": 40, "lr": 0.05}))

    config = resolve_config(config_file=path, overrides={"lr": 0.01})

    assert config.preset == "tiny-imagenet-resnet18"
    assert config.generations == 10
    assert config.epochs == 40
    assert config.lr == 0.01


def test_toml_file(tmp_path):
    path = tmp_path / "options.toml"
    path.write_text('strategy = "llf"\nepochs = 6\nnesterov = true\narch_kwargs = { widths = [8, 16, 32, 64] }\n')

    config = resolve_config(config_file=path)

    assert (config.strategy, config.epochs, config.nesterov) == ("llf", 6, True)
    assert config.arch_kwargs == {"widths": [8, 16, 32, 64]}


def test_unknown_key_named(tmp_path):
    path = tmp_path / "options.json"
    path.write_text(json.dumps({"learning_rate": 0.1}))
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'"):
        read_config_file(path)


def test_wrong_type_named(tmp_path):
    path = tmp_path / "options.json"
    path.write_text(json.dumps({"epochs": "four"}))
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        read_config_file(path)


def test_int_accepted_for_float():
    assert resolve_config(overrides={"lr": 1}).lr == 1.0


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'cifar'"):
        resolve_config(preset="cifar")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("warmup_epochs", 4, "warmup_epochs must be in"),
        ("ascent_epochs", 5, "ascent_epochs must be in"),
        ("lr", -0.1, "lr must be > 0"),
        ("momentum", 1.0, "momentum must be in"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("amp", "fp8", "amp must be one of"),
        ("run_name", "a/b", "run_name must be a plain folder name"),
    ],
)
def test_invalid_values(key, value, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides={"epochs": 4, key: value})


@pytest.mark.parametrize("preset", ["tiny-imagenet-resnet18", "tiny-imagenet-resnet50"])
def test_paper_presets(preset):
    # Defaults of the SEAL authors' code for Tiny-ImageNet (Sarfi et al., CVPR 2023).
    expected = {
        "dataset": "tiny-imagenet", "num_classes": 200, "threshold": "layer3", "generations": 10, "epochs": 160,
        "warmup_epochs": 20, "ascent_epochs": 40, "ascent_scale": -0.01, "lr": 0.1, "momentum": 0.9,
        "weight_decay": 5e-4, "batch_size": 32, "label_smoothing": 0.1, "augment": True, "crop_padding": 4,
        "flip": True, "val_fraction": 0.0,
    }
    config = resolve_config(preset=preset)
    for key, value in expected.items():
        assert getattr(config, key) == value, key
    assert config.arch == preset.rsplit("-", 1)[1]


def test_demo_is_default():
    assert resolve_config() == TrainConfig()


def test_presets_are_valid():
    for name in PRESETS:
        assert resolve_config(preset=name).preset == name
