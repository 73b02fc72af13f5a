"""Tests of probe-layer resolution, hook capture and on-disk embedding extraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seal_probe.layers import (
    EmbeddingStore,
    ProbeLayerError,
    ProbePoint,
    capture_layers,
    choose_reduction,
    extract_embeddings,
    resolve_probe_layers,
    trace_execution,
)
from seal_train.data import BatchLoader, ImageDataset, to_float
from seal_train.models import build_model

SHAPE = (1, 28, 28)


def narrow_resnet(seed: int = 0) -> nn.Module:
    """The demo ResNet with non-trivial BatchNorm statistics, so eval mode differs from train mode."""
    torch.manual_seed(seed)
    model = build_model("resnet-narrow", num_classes=10, in_channels=1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model


def all_hooks(model: nn.Module) -> int:
    return sum(len(module._forward_hooks) + len(module._forward_pre_hooks) for module in model.modules())


def direct_activations(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Compute the default probe layers of the narrow ResNet by calling its modules by hand."""
    with torch.no_grad():
        model.eval()
        stem = model.maxpool(model.relu(model.bn1(model.conv1(images))))
        block1 = model.layer1[0](stem)
        block2 = model.layer2[0](block1)
        block3 = model.layer3[0](block2)
        block4 = model.layer4[0](block3)
        pooled = torch.flatten(model.avgpool(block4), 1)
        logits = model.fc(pooled)
    return {
        "input": images,
        "maxpool": stem,
        "layer1.0": block1,
        "layer2.0": block2,
        "layer3.0": block3,
        "layer4.0": block4,
        "avgpool": pooled,
        "output": logits,
    }


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def test_resnet_default_layers():
    layers = resolve_probe_layers(narrow_resnet(), input_shape=SHAPE)
    assert layers == ["input", "maxpool", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "avgpool", "output"]


def test_resnet_layers_guess_input_shape():
    assert resolve_probe_layers(narrow_resnet())[:3] == ["input", "maxpool", "layer1.0"]


def test_generic_model_default_layers():
    assert resolve_probe_layers(SmallNet(), input_shape=SHAPE) == ["input", "features.0", "features.1", "pool", "output"]


def test_patterns_sorted_by_execution():
    layers = resolve_probe_layers(narrow_resnet(), ["output", "layer3.0", "layer1.0", "input"], input_shape=SHAPE)
    assert layers == ["input", "layer1.0", "layer3.0", "output"]


def test_wildcard_pattern_expands():
    layers = resolve_probe_layers(narrow_resnet(), ["layer[34].0*conv2"], input_shape=SHAPE)
    assert layers == ["layer3.0.conv2", "layer4.0.conv2"]


def test_unknown_pattern_lists_candidates():
    with pytest.raises(ProbeLayerError, match=r"'layer9'.*candidates: input, output, penultimate, conv1"):
        resolve_probe_layers(narrow_resnet(), ["layer9"], input_shape=SHAPE)


def test_module_run_twice_rejected():
    # BasicBlock applies its relu twice, so its output is ambiguous.
    with pytest.raises(ProbeLayerError, match="runs 2 times"):
        resolve_probe_layers(narrow_resnet(), ["layer1.0.relu"], input_shape=SHAPE)


def test_penultimate_sits_before_output():
    assert resolve_probe_layers(narrow_resnet(), ["output", "penultimate", "avgpool"], input_shape=SHAPE) == ["avgpool", "penultimate", "output"]


def test_wrong_input_shape_names_fix():
    with pytest.raises(ProbeLayerError, match="input_shape"):
        trace_execution(SmallNet(), input_shape=(3, 28, 28))


def test_hooks_removed_after_success():
    model = narrow_resnet()
    seen = []
    points = [ProbePoint("layer1.0", "layer1.0", "output"), ProbePoint("penultimate", "fc", "input")]
    with capture_layers(model, points, lambda layer, tensor: seen.append(layer)):
        assert all_hooks(model) == 2
        model.eval()(torch.zeros(2, *SHAPE))
    assert seen == ["layer1.0", "penultimate"]
    assert all_hooks(model) == 0


def test_hooks_removed_after_exception():
    model = narrow_resnet()
    points = [ProbePoint("input", "", "input"), ProbePoint("layer2.0", "layer2.0", "output")]
    with pytest.raises(RuntimeError, match="inside the context"):
        with capture_layers(model, points, lambda layer, tensor: None):
            raise RuntimeError("failure inside the context")
    assert all_hooks(model) == 0


def test_hooks_removed_after_failed_trace():
    model = SmallNet()
    with pytest.raises(ProbeLayerError):
        trace_execution(model, input_shape=(3, 5, 5))
    assert all_hooks(model) == 0


def test_hooks_removed_after_failed_extraction():
    model = narrow_resnet()
    images = torch.randn(6, *SHAPE)
    with pytest.raises(ProbeLayerError, match="num_examples"):
        extract_embeddings(model, [images[:3], images[3:]], num_examples=4)
    assert all_hooks(model) == 0


def test_embeddings_match_direct_forward():
    model = narrow_resnet()
    images = torch.randn(13, *SHAPE)
    expected = direct_activations(model, images)
    pooled_sizes = {"maxpool": 16, "layer1.0": 16, "layer2.0": 11}  # largest s with C*s*s <= 4096

    with extract_embeddings(model, images, batch_size=5) as store:
        assert store.layer_names == list(expected)
        for layer, activation in expected.items():
            if layer in pooled_sizes:
                activation = F.adaptive_avg_pool2d(activation, pooled_sizes[layer])
            np.testing.assert_allclose(store.embeddings(layer), activation.reshape(13, -1).numpy(), rtol=1e-5, atol=1e-5, err_msg=layer)
        np.testing.assert_allclose(store.logits, expected["output"].numpy(), rtol=1e-5, atol=1e-5)


def test_flatten_matches_direct_forward():
    model = narrow_resnet()
    images = torch.randn(4, *SHAPE)
    expected = direct_activations(model, images)["layer1.0"].reshape(4, -1).numpy()
    with extract_embeddings(model, images, ["layer1.0"], reduce="flatten") as store:
        assert store.layers["layer1.0"].dim == 16 * 28 * 28
        np.testing.assert_allclose(store.reader("layer1.0")[:], expected, rtol=1e-5, atol=1e-5)


def test_penultimate_equals_fc_input():
    model = narrow_resnet()
    images = torch.randn(5, *SHAPE)
    expected = direct_activations(model, images)["avgpool"].numpy()
    with extract_embeddings(model, images, ["penultimate"]) as store:
        np.testing.assert_allclose(store.embeddings("penultimate"), expected, rtol=1e-5, atol=1e-6)


def test_model_unchanged_by_extraction():
    model = narrow_resnet()
    model.train()
    model.layer2.eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with extract_embeddings(model, torch.randn(8, *SHAPE), batch_size=3):
        pass
    after = model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert model.training
    assert not model.layer2.training
    assert model.layer3.training


def test_reduction_sizes_by_hand():
    assert choose_reduction((16, 28, 28), reduce="pool", max_dim=4096).pooled_size == (16, 16)
    assert choose_reduction((32, 14, 14), reduce="pool", max_dim=4096).dim == 32 * 11 * 11
    assert choose_reduction((64, 7, 7), reduce="pool", max_dim=4096).kind == "none"
    assert choose_reduction((5000, 2, 2), reduce="pool", max_dim=4096).dim == 5000
    assert choose_reduction((3, 4, 100), reduce="pool", max_dim=120).pooled_size == (4, 6)
    assert choose_reduction((16, 28, 28), reduce="flatten", max_dim=4096).dim == 12544


def test_large_token_map_rejected():
    with pytest.raises(ProbeLayerError, match="reduce='flatten'"):
        choose_reduction((50, 200), reduce="pool", max_dim=4096)


def test_temporary_store_deleted_on_close():
    store = extract_embeddings(narrow_resnet(), torch.randn(3, *SHAPE), ["input"])
    directory = store.directory
    assert directory.is_dir()
    store.close()
    assert not directory.exists()


def test_out_dir_kept_and_reopened(tmp_path):
    images = torch.randn(4, *SHAPE)
    out_dir = tmp_path / "embeddings"
    with extract_embeddings(narrow_resnet(), images, ["input", "avgpool"], out_dir=out_dir):
        pass
    reopened = EmbeddingStore.open(out_dir)
    assert reopened.layer_names == ["input", "avgpool"]
    np.testing.assert_array_equal(reopened.embeddings("input"), images.reshape(4, -1).numpy())


def test_out_dir_not_empty_rejected(tmp_path):
    (tmp_path / "keep.txt").write_text("existing")
    with pytest.raises(ProbeLayerError, match="not empty"):
        extract_embeddings(narrow_resnet(), torch.randn(2, *SHAPE), out_dir=tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["keep.txt"]


def test_failed_extraction_leaves_nothing(tmp_path):
    with pytest.raises(ProbeLayerError):
        extract_embeddings(narrow_resnet(), [torch.randn(2, *SHAPE)], num_examples=3, out_dir=tmp_path / "embeddings")
    assert list(tmp_path.iterdir()) == []


def test_loader_matches_tensor():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (10, *SHAPE), dtype=torch.uint8, generator=generator)
    labels = torch.arange(10) % 3
    dataset = ImageDataset(images, labels, ["a", "b", "c"], "toy", "test", (0.5,), (0.25,))
    model = narrow_resnet()
    loader = BatchLoader(dataset, batch_size=4, shuffle=False)
    with extract_embeddings(model, loader, ["layer2.0"]) as from_loader, extract_embeddings(model, to_float(images, (0.5,), (0.25,)), ["layer2.0"]) as from_tensor:
        np.testing.assert_array_equal(from_loader.labels, labels.numpy())
        np.testing.assert_allclose(from_loader.embeddings("layer2.0"), from_tensor.embeddings("layer2.0"), rtol=1e-5, atol=1e-6)


def test_uint8_images_rejected():
    with pytest.raises(ProbeLayerError, match="prepare_images"):
        extract_embeddings(narrow_resnet(), torch.zeros(2, *SHAPE, dtype=torch.uint8))


class BranchingNet(nn.Module):
    """Runs `positive` on inputs with a positive sum and `other` otherwise, so the dummy trace runs `other` only."""

    def __init__(self) -> None:
        super().__init__()
        self.positive = nn.Linear(4, 2)
        self.other = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.positive(x) if x.sum() > 0 else self.other(x)


def test_layer_that_never_runs_rejected():
    with pytest.raises(ProbeLayerError, match="other did not run"):
        extract_embeddings(BranchingNet(), torch.ones(3, 4), ["input", "other"])


def test_changing_shape_rejected():
    batches = [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 10, 10)]
    with pytest.raises(ProbeLayerError, match="same shape"):
        extract_embeddings(SmallNet(), batches, ["features.0"], reduce="flatten", num_examples=4)
