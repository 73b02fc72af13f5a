"""Model registry: arch_kwargs keys come from the builders, and bad keys or values raise ModelError."""

from __future__ import annotations

import pytest

from seal_train.models import MODELS, ModelError, arch_kwargs_keys, build_model, check_arch_kwargs


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "cifar-resnet18", "resnet-narrow"])
def test_registry_takes_widths_only(arch):
    assert arch_kwargs_keys(arch) == ["widths"]


def test_unknown_key_names_valid_keys():
    with pytest.raises(ModelError) as error:
        build_model("resnet-narrow", num_classes=10, wid=3)
    assert str(error.value) == "unknown --arch-kwargs key 'wid' for resnet-narrow; valid keys: widths"


def test_builder_fixed_argument_rejected():
    """stem is set by each builder, so arch_kwargs cannot override it."""
    with pytest.raises(ModelError, match="unknown --arch-kwargs key 'stem' for cifar-resnet18"):
        check_arch_kwargs("cifar-resnet18", {"stem": "imagenet"})


def test_unknown_arch_checked():
    with pytest.raises(ModelError, match="unknown architecture 'resnet7'"):
        check_arch_kwargs("resnet7", {})


@pytest.mark.parametrize("widths", [4, [4, 8, 8], [4, 8, 8, 0], [4, 8, 8, 8.5], "4888"])
def test_invalid_widths(widths):
    with pytest.raises(ModelError, match="widths must be a list of 4 positive integers|4 stages"):
        build_model("resnet-narrow", num_classes=10, widths=widths)


def test_torchvision_unknown_key():
    with pytest.raises(ModelError) as error:
        build_model("torchvision:resnet18", num_classes=10, wid=3)
    assert "invalid --arch-kwargs {'wid': 3} for torchvision:resnet18" in str(error.value)
    assert "wid" in str(error.value.__cause__)


def test_valid_widths_build():
    model = build_model("resnet-narrow", num_classes=10, in_channels=1, widths=[4, 8, 8, 8])
    assert model.fc.in_features == 8


def test_builder_with_var_keyword_unchecked(monkeypatch):
    """A registered builder that takes **kwargs receives every key; check_arch_kwargs cannot know its keys."""
    received = {}

    def builder(num_classes, in_channels, **kwargs):
        received.update(kwargs)
        return build_model("resnet-narrow", num_classes=num_classes, in_channels=in_channels, widths=[4, 8, 8, 8])

    monkeypatch.setitem(MODELS, "test-any-kwargs", builder)
    check_arch_kwargs("test-any-kwargs", {"depth": 3})
    build_model("test-any-kwargs", num_classes=10, depth=3)
    assert received == {"depth": 3}
