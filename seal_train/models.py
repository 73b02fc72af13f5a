"""Model registry (the paper's ResNets, a CIFAR-style ResNet, a narrow demo ResNet, torchvision) and the early/late split."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


class ModelError(ValueError):
    """An unknown architecture, threshold block or incompatible model argument."""


class ResNet(nn.Module):
    """A ResNet with torchvision's module names (conv1, bn1, layer1..layer4, fc) and configurable widths.

    stem="imagenet" is the 7x7 stride-2 convolution plus 3x3 max-pool of He et al. (2016), used by
    the SEAL authors on 64x64 Tiny-ImageNet; stem="cifar" is a 3x3 stride-1 convolution with no
    pooling, for 28x28 and 32x32 images. Convolutions have no bias; they are initialised with
    kaiming-normal (fan_out, ReLU gain) and BatchNorm with weight 1 and bias 0, as torchvision does.
    With the default widths the state-dict keys equal torchvision's resnet18/resnet50.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: tuple[int, ...],
        *,
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        if not isinstance(widths, (list, tuple)) or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
            raise ModelError(f"widths must be a list of {len(blocks_per_stage)} positive integers, got {widths!r}")
        if len(widths) != len(blocks_per_stage):
            raise ModelError(f"{len(widths)} widths for {len(blocks_per_stage)} stages; give one width per stage")
        if stem not in ("imagenet", "cifar"):
            raise ModelError(f"unknown stem {stem!r}; choose 'imagenet' or 'cifar'")

        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        for stage, (width, count) in enumerate(zip(widths, blocks_per_stage), start=1):
            setattr(self, f"layer{stage}", self._make_stage(block, width, count, stride=1 if stage == 1 else 2))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)

    def _make_stage(self, block, planes: int, count: int, *, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, count)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _replace_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Swap the first convolution of a torchvision model for one that takes in_channels."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return model
            replacement = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, module.bias is not None,
            )
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
            return model
    raise ModelError(f"{type(model).__name__} has no Conv2d whose input channels could be set to {in_channels}")


# A builder takes num_classes and in_channels positionally; its keyword-only parameters are the
# keys that arch_kwargs may set.
ModelBuilder = Callable[..., nn.Module]
RESNET_WIDTHS = (64, 128, 256, 512)


def _resnet18(num_classes: int, in_channels: int, *, widths: tuple[int, ...] = RESNET_WIDTHS) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), widths=widths, num_classes=num_classes, in_channels=in_channels, stem="imagenet")


def _resnet50(num_classes: int, in_channels: int, *, widths: tuple[int, ...] = RESNET_WIDTHS) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), widths=widths, num_classes=num_classes, in_channels=in_channels, stem="imagenet")


def _cifar_resnet18(num_classes: int, in_channels: int, *, widths: tuple[int, ...] = RESNET_WIDTHS) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), widths=widths, num_classes=num_classes, in_channels=in_channels, stem="cifar")


def _resnet_narrow(num_classes: int, in_channels: int, *, widths: tuple[int, ...] = (16, 32, 64, 128)) -> ResNet:
    # Sized for the CPU demo: one BasicBlock per stage and widths 16..128 (about 0.3M parameters).
    return ResNet(BasicBlock, (1, 1, 1, 1), widths=widths, num_classes=num_classes, in_channels=in_channels, stem="cifar")


MODELS: dict[str, ModelBuilder] = {
    "resnet18": _resnet18,
    "resnet50": _resnet50,
    "cifar-resnet18": _cifar_resnet18,
    "resnet-narrow": _resnet_narrow,
}
TORCHVISION_PREFIX = "torchvision:"


def available_architectures() -> list[str]:
    return [*MODELS, f"{TORCHVISION_PREFIX}<name>"]


def arch_kwargs_keys(arch: str) -> list[str]:
    """Return the keys that arch_kwargs may set for a registry architecture: its builder's keyword-only parameters."""
    if arch not in MODELS:
        raise ModelError(f"unknown architecture {arch!r}; choose one of: {', '.join(available_architectures())}")
    parameters = inspect.signature(MODELS[arch]).parameters.values()
    return [parameter.name for parameter in parameters if parameter.kind is inspect.Parameter.KEYWORD_ONLY]


def check_arch_kwargs(arch: str, kwargs: dict[str, Any]) -> None:
    """Raise ModelError for an unknown registry architecture or an arch_kwargs key its builder does not take.

    torchvision models and registered builders with **kwargs pass their keyword arguments on, so
    their keys are checked only when build_model constructs the model.
    """
    if arch.startswith(TORCHVISION_PREFIX):
        return
    valid = arch_kwargs_keys(arch)
    parameters = inspect.signature(MODELS[arch]).parameters.values()
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
        return  # a builder that takes **kwargs checks its keys itself
    for key in kwargs:
        if key not in valid:
            raise ModelError(f"unknown --arch-kwargs key {key!r} for {arch}; valid keys: {', '.join(valid) or 'none'}")


def build_model(arch: str, *, num_classes: int, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a randomly initialised model by registry name or "torchvision:<name>"."""
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if arch.startswith(TORCHVISION_PREFIX):
        import torchvision

        name = arch[len(TORCHVISION_PREFIX):]
        if name not in torchvision.models.list_models(module=torchvision.models):
            raise ModelError(f"unknown torchvision classification model {name!r}; see torchvision.models.list_models()")
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        except TypeError as error:
            if not kwargs:
                raise
            # The model class rejects an unexpected keyword or a value of the wrong type.
            raise ModelError(f"invalid --arch-kwargs {kwargs} for {arch}: {error}") from error
        return _replace_input_channels(model, in_channels) if in_channels != 3 else model
    check_arch_kwargs(arch, kwargs)
    return MODELS[arch](num_classes, in_channels, **kwargs)


def threshold_choices(model: nn.Module) -> list[str]:
    """Return the top-level module names that own parameters, in execution-definition order."""
    return [name for name, child in model.named_children() if any(True for _ in child.parameters())]


def split_parameters(model: nn.Module, threshold: str) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """Split named_parameters() at the first parameter inside the threshold block.

    Early: every parameter before the first one whose dotted name starts with the threshold's
    whole components ("layer3" matches "layer3.0.conv1.weight", never "layer30.weight";
    "layer3.1" matches "layer3.1.bn2.bias"). Late: that parameter and all after it. BatchNorm
    running statistics are buffers and belong to neither.
    """
    named = list(model.named_parameters())
    target = threshold.split(".")
    width = len(target)
    for position, (name, _) in enumerate(named):
        parts = name.split(".")
        if parts[:width] == target:
            if position == 0:
                raise ModelError(f"threshold {threshold!r} is the first block, so no parameter would be early; choose a later block")
            return named[:position], named[position:]
    raise ModelError(f"threshold block {threshold!r} not found in {type(model).__name__}; valid blocks: {', '.join(threshold_choices(model))}")
