"""Tests for seal_probe.loading and seal_probe.integrity on checkpoints written here from real models."""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from seal_probe.integrity import ModelChangedError, assert_model_unchanged, model_unchanged, snapshot_model_state
from seal_probe.loading import CheckpointLoadError, load_model, strip_wrapper_prefixes
from seal_train.checkpoint import make_meta, save_checkpoint
from seal_train.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD, InputSpec
from seal_train.models import build_model

NARROW_SPEC = InputSpec(1, 28, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
# Options that describe the narrow model's input for files that do not record it.
NARROW_OPTIONS = {"arch": "resnet-narrow", "input_size": 28, "mean": FASHION_MNIST_MEAN, "std": FASHION_MNIST_STD}

TINY_NET_SOURCE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.head(x.mean(dim=(2, 3)))


class Wrapper(nn.Module):
    """A model whose only child is called "module", so its own keys start with "module."."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.module = TinyNet(num_classes, in_channels)

    def forward(self, x):
        return self.module(x)
'''


# ---------------------------------------------------------------- helpers


def _randomise_batchnorm(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-default statistics and affine parameters, so loading them is tested."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.1)
    return model.eval()


def _narrow(seed: int = 0, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_batchnorm(build_model("resnet-narrow", num_classes=num_classes, in_channels=1), seed)


def _narrow_input() -> torch.Tensor:
    return torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(7))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load_unmodified(path: Path, **options):
    """Load path and fail if the file's bytes changed or the recorded hash is wrong."""
    before = _sha256(path)
    loaded = load_model(path, **options)
    assert _sha256(path) == before
    assert loaded.sha256 == before
    return loaded


def _import_file(path: Path, class_name: str) -> type:
    spec = importlib.util.spec_from_file_location(f"test_model_def_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Run torch on one thread: on a shared machine with few cores, more threads make tiny models much slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def narrow() -> nn.Module:
    return _narrow()


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory) -> tuple[Path, nn.Module]:
    """A checkpoint as the SEAL authors' training code writes it: ResNet18, 200 classes, bookkeeping keys."""
    torch.manual_seed(1)
    model = _randomise_batchnorm(build_model("resnet18", num_classes=200, in_channels=3), 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path_factory.mktemp("authors") / "seal_gen3.pth"
    torch.save(
        {"epoch": 159, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "best_acc": 41.5},
        path,
    )
    return path, model


# ---------------------------------------------------------------- the loading matrix


def test_suite_checkpoint_outputs(tmp_path, narrow):
    meta = make_meta(
        arch="resnet-narrow", arch_kwargs={}, num_classes=10, input_spec=NARROW_SPEC,
        dataset={"name": "fashion-mnist-subset"}, strategy="seal", generation=2, epoch=5,
        kind="generation", config={}, metrics=[], seed=0, threshold="layer3",
    )
    path = save_checkpoint(tmp_path / "suite.pt", model=narrow, meta=meta)

    loaded = _load_unmodified(path)

    torch.testing.assert_close(_outputs(loaded.model, _narrow_input()), _outputs(narrow, _narrow_input()))
    assert loaded.input_spec == NARROW_SPEC
    assert loaded.arch == "resnet-narrow"
    assert loaded.source.format == "seal-suite"
    assert loaded.meta["strategy"] == "seal"
    assert not loaded.model.training


def test_suite_checkpoint_conflicting_option(tmp_path, narrow):
    meta = make_meta(
        arch="resnet-narrow", arch_kwargs={}, num_classes=10, input_spec=NARROW_SPEC,
        dataset={}, strategy="normal", generation=0, epoch=0, kind="generation",
        config={}, metrics=[], seed=0, threshold="layer3",
    )
    path = save_checkpoint(tmp_path / "suite.pt", model=narrow, meta=meta)

    with pytest.raises(CheckpointLoadError, match=r"num_classes=7 does not match the value 10"):
        load_model(path, num_classes=7)


def test_authors_checkpoint_inferred(authors_file):
    path, original = authors_file
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))

    loaded = _load_unmodified(path)

    torch.testing.assert_close(_outputs(loaded.model, x), _outputs(original, x))
    assert loaded.arch == "resnet18"
    assert loaded.num_classes == 200
    assert loaded.input_spec == InputSpec(3, 64, 64, IMAGENET_MEAN, IMAGENET_STD)
    assert loaded.source.wrapper_key == "model_state_dict"
    assert set(loaded.source.inferred) == {"arch", "num_classes", "in_channels", "input_size", "mean", "std"}
    assert loaded.source.bookkeeping == {"epoch": 159, "best_acc": 41.5}
    assert "optimizer_state_dict" in loaded.source.unused_keys


def test_authors_checkpoint_input_override(authors_file):
    path, _ = authors_file

    loaded = load_model(path, input_size=(32, 48))

    assert (loaded.input_spec.height, loaded.input_spec.width) == (32, 48)
    assert "input_size" not in loaded.source.inferred


def test_authors_checkpoint_json_record(authors_file):
    path, _ = authors_file

    record = json.loads(json.dumps(load_model(path).to_dict()))

    assert record["source"]["key_match"]["loaded"] == len(build_model("resnet18", num_classes=200).state_dict())
    assert record["sha256"] == _sha256(path)


def test_raw_torchvision_state_dict(tmp_path):
    torch.manual_seed(2)
    original = _randomise_batchnorm(torchvision.models.resnet18(num_classes=7), 2)
    path = tmp_path / "torchvision_resnet18.pt"
    torch.save(original.state_dict(), path)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))

    loaded = _load_unmodified(path, arch="torchvision:resnet18", input_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)

    torch.testing.assert_close(_outputs(loaded.model, x), _outputs(original, x))
    assert loaded.num_classes == 7
    assert loaded.source.wrapper_key is None


def test_raw_state_dict_needs_input(tmp_path, narrow):
    path = tmp_path / "raw.pt"
    torch.save(narrow.state_dict(), path)

    with pytest.raises(CheckpointLoadError, match=r"pass --input-size, --mean, --std"):
        load_model(path, arch="resnet-narrow")


def test_raw_narrow_detected(tmp_path, narrow):
    path = tmp_path / "raw.pt"
    torch.save(narrow.state_dict(), path)

    loaded = load_model(path, input_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)

    assert loaded.arch == "resnet-narrow"
    torch.testing.assert_close(_outputs(loaded.model, _narrow_input()), _outputs(narrow, _narrow_input()))


def test_model_def_file(tmp_path):
    source_file = tmp_path / "tiny_net.py"
    source_file.write_text(TINY_NET_SOURCE)
    torch.manual_seed(5)
    original = _randomise_batchnorm(_import_file(source_file, "TinyNet")(num_classes=5, in_channels=3), 5)
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": original.state_dict()}, path)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6))

    loaded = _load_unmodified(path, model_def=f"{source_file}:TinyNet", input_size=8, mean=[0.5] * 3, std=[0.25] * 3)

    torch.testing.assert_close(_outputs(loaded.model, x), _outputs(original, x))
    assert loaded.num_classes == 5
    assert loaded.source.inferred["num_classes"]["value"] == 5


def test_model_def_missing_class(tmp_path):
    source_file = tmp_path / "tiny_net.py"
    source_file.write_text(TINY_NET_SOURCE)
    path = tmp_path / "tiny.pt"
    torch.save(_import_file(source_file, "TinyNet")().state_dict(), path)

    with pytest.raises(CheckpointLoadError, match=r"no nn.Module subclass 'Missing'; classes found: TinyNet"):
        load_model(path, model_def=f"{source_file}:Missing", input_size=8, mean=[0.5] * 3, std=[0.25] * 3)


@pytest.mark.parametrize(
    "key", ["state_dict", "model", "model_state_dict", "net", "network", "model_ema", "state_dict_ema", "ema_state_dict", "ema"]
)
def test_wrapper_key(tmp_path, narrow, key):
    path = tmp_path / "wrapped.pt"
    torch.save({key: narrow.state_dict(), "epoch": 3, "args": {"lr": 0.1}}, path)

    loaded = _load_unmodified(path, **NARROW_OPTIONS)

    torch.testing.assert_close(_outputs(loaded.model, _narrow_input()), _outputs(narrow, _narrow_input()))
    assert loaded.source.wrapper_key == key


def test_nested_wrapper_keys(tmp_path, narrow):
    path = tmp_path / "nested.pt"
    torch.save({"model": {"state_dict": narrow.state_dict()}}, path)

    loaded = load_model(path, **NARROW_OPTIONS)

    assert loaded.source.wrapper_key == "model.state_dict"


@pytest.mark.parametrize(("ema", "expected_key", "takes_ema"), [("auto", "model_ema", True), ("use", "model_ema", True), ("ignore", "state_dict", False)])
def test_ema_choice(tmp_path, ema, expected_key, takes_ema):
    plain, averaged = _narrow(seed=10), _narrow(seed=11)
    path = tmp_path / "ema.pt"
    torch.save({"state_dict": plain.state_dict(), "model_ema": averaged.state_dict()}, path)

    loaded = load_model(path, ema=ema, **NARROW_OPTIONS)

    expected_model = averaged if takes_ema else plain
    torch.testing.assert_close(_outputs(loaded.model, _narrow_input()), _outputs(expected_model, _narrow_input()))
    assert loaded.source.wrapper_key == expected_key
    assert loaded.source.ema is takes_ema
    assert loaded.source.other_weights == ["state_dict" if takes_ema else "model_ema"]


def test_ema_use_without_ema(tmp_path, narrow):
    path = tmp_path / "plain.pt"
    torch.save({"state_dict": narrow.state_dict()}, path)

    with pytest.raises(CheckpointLoadError, match=r"has no EMA weights"):
        load_model(path, ema="use", **NARROW_OPTIONS)


def _wrap_data_parallel(model: nn.Module) -> nn.Module:
    return nn.DataParallel(model)


def _wrap_compile(model: nn.Module) -> nn.Module:
    return torch.compile(model)  # lazy: nothing compiles until the first call, which never comes


def _compile_submodule(model: nn.Module) -> nn.Module:
    model.layer2 = torch.compile(model.layer2)
    return model


@pytest.mark.parametrize(
    "wrappers",
    [
        (_wrap_data_parallel,),
        (_wrap_compile,),
        (_wrap_compile, _wrap_data_parallel),
        (_wrap_data_parallel, _wrap_compile),
        (_wrap_data_parallel, _wrap_data_parallel),
        (_compile_submodule, _wrap_data_parallel),
    ],
    ids=["module", "orig_mod", "module-orig_mod", "orig_mod-module", "module-module", "inner-orig_mod"],
)
def test_wrapper_prefixes(tmp_path, wrappers):
    original = _narrow(seed=12)
    wrapped = copy.deepcopy(original)  # compiling a submodule replaces it in place
    for wrap in wrappers:
        wrapped = wrap(wrapped)
    path = tmp_path / "prefixed.pt"
    torch.save({"model": wrapped.state_dict()}, path)

    loaded = load_model(path, **NARROW_OPTIONS)

    torch.testing.assert_close(_outputs(loaded.model, _narrow_input()), _outputs(original, _narrow_input()))
    assert loaded.source.prefixes_stripped


def test_prefix_kept_for_module_child(tmp_path):
    source_file = tmp_path / "tiny_net.py"
    source_file.write_text(TINY_NET_SOURCE)
    torch.manual_seed(8)
    original = _randomise_batchnorm(_import_file(source_file, "Wrapper")(num_classes=4, in_channels=3), 8)
    path = tmp_path / "wrapper.pt"
    torch.save(original.state_dict(), path)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(9))

    loaded = load_model(path, model_def=f"{source_file}:Wrapper", input_size=8, mean=[0.5] * 3, std=[0.25] * 3)

    torch.testing.assert_close(_outputs(loaded.model, x), _outputs(original, x))
    assert loaded.source.prefixes_stripped == []


def test_strip_prefixes_collision():
    state_dict = {"block._orig_mod.weight": torch.zeros(1), "block.weight": torch.ones(1)}

    stripped, prefixes = strip_wrapper_prefixes(state_dict)

    assert list(stripped) == list(state_dict)
    assert prefixes == []


def test_safetensors_file(tmp_path, narrow):
    path = tmp_path / "narrow.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in narrow.state_dict().items()}, str(path))

    loaded = _load_unmodified(path, **NARROW_OPTIONS)

    torch.testing.assert_close(_outputs(loaded.model, _narrow_input()), _outputs(narrow, _narrow_input()))
    assert loaded.source.format == "safetensors"


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archive(tmp_path, narrow):
    path = tmp_path / "narrow_script.pt"
    torch.jit.save(torch.jit.trace(narrow, _narrow_input()), str(path))

    loaded = _load_unmodified(path, input_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)

    torch.testing.assert_close(_outputs(loaded.model, _narrow_input()), _outputs(narrow, _narrow_input()))
    assert loaded.arch == "torchscript"
    assert loaded.num_classes == 10


def test_pickled_module_rejected(tmp_path, narrow):
    path = tmp_path / "whole.pt"
    torch.save(narrow, path)

    with pytest.raises(CheckpointLoadError, match=r"seal_train\.models\.ResNet.*pass --trust-checkpoint"):
        load_model(path, input_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


def test_rejected_file_unchanged(tmp_path, narrow):
    path = tmp_path / "whole.pt"
    torch.save(narrow, path)
    before = _sha256(path)

    with pytest.raises(CheckpointLoadError):
        load_model(path, input_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)

    assert _sha256(path) == before


def test_pickled_module_trusted(tmp_path, narrow):
    path = tmp_path / "whole.pt"
    torch.save(narrow, path)

    loaded = _load_unmodified(path, trust_checkpoint=True, input_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)

    torch.testing.assert_close(_outputs(loaded.model, _narrow_input()), _outputs(narrow, _narrow_input()))
    assert loaded.source.format == "pickled-module"


def test_pickled_module_under_key_rejected(tmp_path, narrow):
    path = tmp_path / "wrapped_whole.pt"
    torch.save({"model": narrow, "epoch": 1}, path)

    with pytest.raises(CheckpointLoadError, match=r"under 'model' as a pickled seal_train\.models\.ResNet"):
        load_model(path, input_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


def test_bookkeeping_objects_stand_in(tmp_path, narrow):
    path = tmp_path / "numpy_args.pt"
    torch.save({"model_state_dict": narrow.state_dict(), "best_acc": np.float64(88.5), "args": argparse.Namespace(lr=0.1)}, path)

    loaded = load_model(path, **NARROW_OPTIONS)

    torch.testing.assert_close(_outputs(loaded.model, _narrow_input()), _outputs(narrow, _narrow_input()))
    assert "argparse.Namespace" in loaded.source.stand_ins


class _RunsCode:
    """Pickles as a call of `function` with `argument`, as a malicious checkpoint would."""

    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return (self.function, (self.argument,))


def test_pickle_os_call_rejected(tmp_path, narrow):
    marker = tmp_path / "code_ran"
    path = tmp_path / "malicious.pt"
    torch.save({"model_state_dict": narrow.state_dict(), "payload": _RunsCode(os.system, f"touch {marker}")}, path)

    with pytest.raises(CheckpointLoadError, match=r"weights_only loading rejects; if you trust the file's source, pass --trust-checkpoint"):
        load_model(path, **NARROW_OPTIONS)
    assert not marker.exists()


def test_pickle_with_exec_inert(tmp_path, narrow):
    marker = tmp_path / "code_ran"
    path = tmp_path / "malicious.pt"
    torch.save({"model_state_dict": narrow.state_dict(), "payload": _RunsCode(exec, f"open({str(marker)!r}, 'w').close()")}, path)

    loaded = load_model(path, **NARROW_OPTIONS)

    assert not marker.exists()
    assert "builtins.exec" in loaded.source.stand_ins


# ---------------------------------------------------------------- rejections


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointLoadError, match=r"missing\.pt not found; check the path"):
        load_model(tmp_path / "missing.pt")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")

    with pytest.raises(CheckpointLoadError, match=r"is empty"):
        load_model(path)


def test_text_file(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("learning rate 0.1, 160 epochs\n")

    with pytest.raises(CheckpointLoadError, match=r"is not a PyTorch checkpoint"):
        load_model(path)


def test_image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    Image.new("RGB", (4, 4), color=(200, 10, 10)).save(path)

    with pytest.raises(CheckpointLoadError, match=r"is not a PyTorch checkpoint"):
        load_model(path)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_file(tmp_path, narrow, zip_format):
    complete = tmp_path / "complete.pt"
    torch.save({"model_state_dict": narrow.state_dict()}, complete, _use_new_zipfile_serialization=zip_format)
    data = complete.read_bytes()
    path = tmp_path / "truncated.pt"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointLoadError, match=r"truncated or corrupt"):
        load_model(path, **NARROW_OPTIONS)


def test_truncated_safetensors(tmp_path, narrow):
    complete = tmp_path / "complete.safetensors"
    save_file({key: tensor.contiguous() for key, tensor in narrow.state_dict().items()}, str(complete))
    data = complete.read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(CheckpointLoadError, match=r"truncated or corrupt"):
        load_model(path, **NARROW_OPTIONS)


def test_mismatched_keys(tmp_path, narrow):
    path = tmp_path / "narrow.pt"
    torch.save(narrow.state_dict(), path)
    wrong = build_model("cifar-resnet18", num_classes=10, in_channels=1).state_dict()
    first_missing = next(key for key in wrong if key not in narrow.state_dict())
    first_mismatch = next(key for key in wrong if key in narrow.state_dict() and wrong[key].shape != narrow.state_dict()[key].shape)

    with pytest.raises(CheckpointLoadError) as caught:
        load_model(path, arch="cifar-resnet18", input_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)

    message = str(caught.value)
    assert "does not match architecture cifar-resnet18" in message
    assert first_missing in message
    assert first_mismatch in message
    assert "\n" not in message


def test_partial_load(tmp_path, narrow, caplog):
    state_dict = {key: tensor for key, tensor in narrow.state_dict().items() if not key.startswith("fc.")}
    state_dict["extra.scale"] = torch.ones(3)
    path = tmp_path / "headless.pt"
    torch.save(state_dict, path)

    with pytest.raises(CheckpointLoadError, match=r"2 missing keys \(fc.weight, fc.bias\); 1 unexpected keys \(extra.scale\)"):
        load_model(path, num_classes=10, **NARROW_OPTIONS)
    with caplog.at_level(logging.WARNING, logger="seal_probe.loading"):
        loaded = load_model(path, num_classes=10, allow_partial=True, **NARROW_OPTIONS)

    assert loaded.source.partial
    assert loaded.source.key_match.loaded == len(state_dict) - 1
    assert loaded.source.key_match.missing == ["fc.weight", "fc.bias"]
    assert torch.equal(loaded.model.conv1.weight, narrow.conv1.weight)
    assert "PARTIAL LOAD" in caplog.text


def test_class_count_mismatch(tmp_path, narrow):
    path = tmp_path / "narrow.pt"
    torch.save({"model_state_dict": narrow.state_dict()}, path)

    with pytest.raises(CheckpointLoadError, match=r"num_classes=5 does not match .* fc.weight has 10 outputs; pass --num-classes 10"):
        load_model(path, num_classes=5, **NARROW_OPTIONS)


def test_channel_mismatch(tmp_path, narrow):
    path = tmp_path / "narrow.pt"
    torch.save({"model_state_dict": narrow.state_dict()}, path)

    with pytest.raises(CheckpointLoadError, match=r"in_channels=3 does not match .* conv1.weight takes 1 input channels; pass --in-channels 1"):
        load_model(path, in_channels=3, **NARROW_OPTIONS)


@pytest.mark.parametrize(("bad_value", "name"), [(float("nan"), "NaN"), (float("inf"), "inf")])
def test_non_finite_weights(tmp_path, bad_value, name):
    state_dict = {key: tensor.clone() for key, tensor in _narrow().state_dict().items()}
    state_dict["layer2.0.conv1.weight"][0, 0, 0, 0] = bad_value
    path = tmp_path / "diverged.pt"
    torch.save(state_dict, path)

    with pytest.raises(CheckpointLoadError, match=rf"tensor 'layer2.0.conv1.weight' contains {name} \(1 of"):
        load_model(path, **NARROW_OPTIONS)


def test_unknown_architecture(tmp_path, narrow):
    path = tmp_path / "narrow.pt"
    torch.save(narrow.state_dict(), path)

    with pytest.raises(CheckpointLoadError, match=r"unknown architecture 'resnet-9000'"):
        load_model(path, arch="resnet-9000", input_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


def test_unknown_layout_needs_arch(tmp_path):
    source_file = tmp_path / "tiny_net.py"
    source_file.write_text(TINY_NET_SOURCE)
    path = tmp_path / "tiny.pt"
    torch.save(_import_file(source_file, "TinyNet")().state_dict(), path)

    with pytest.raises(CheckpointLoadError, match=r"cannot determine the architecture .* pass --arch NAME"):
        load_model(path, input_size=8, mean=[0.5] * 3, std=[0.25] * 3)


def test_timm_not_installed(tmp_path, narrow, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` raise ImportError
    path = tmp_path / "narrow.pt"
    torch.save(narrow.state_dict(), path)

    with pytest.raises(CheckpointLoadError, match=r"needs the timm package, which is not installed; pip install timm"):
        load_model(path, arch="timm:resnet18", input_size=28, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)


def test_invalid_ema_choice(tmp_path, narrow):
    with pytest.raises(CheckpointLoadError, match=r"ema must be one of auto, use, ignore, got 'always'"):
        load_model(tmp_path / "unused.pt", ema="always")


# ---------------------------------------------------------------- integrity


def test_integrity_unchanged_passes():
    model = _narrow()
    snapshot = snapshot_model_state(model)

    _outputs(model, _narrow_input())

    assert_model_unchanged(model, snapshot)


def test_integrity_train_forward_detected():
    model = _narrow()
    snapshot = snapshot_model_state(model)
    first_buffer = next(name for name, _ in model.named_buffers())

    model.train()
    with torch.no_grad():
        model(_narrow_input())

    with pytest.raises(ModelChangedError, match=rf"tensor '{first_buffer}'"):
        assert_model_unchanged(model, snapshot)


def test_integrity_nan_equal():
    model = _narrow()
    with torch.no_grad():
        model.fc.bias[0] = float("nan")
    snapshot = snapshot_model_state(model)

    assert_model_unchanged(model, snapshot)


def test_integrity_signed_zero_detected():
    model = _narrow()
    with torch.no_grad():
        model.fc.bias[1] = 0.0
    snapshot = snapshot_model_state(model)
    with torch.no_grad():
        model.fc.bias[1] = -0.0

    with pytest.raises(ModelChangedError, match=r"tensor 'fc.bias' 1 of 10 values differ"):
        assert_model_unchanged(model, snapshot)


def test_integrity_context_manager():
    model = _narrow()

    with pytest.raises(ModelChangedError, match=r"tensor 'conv1.weight'"):
        with model_unchanged(model):
            with torch.no_grad():
                model.conv1.weight.mul_(2)
