"""Backbones by name, all weights from local files (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

from worker.backbones import (
    CEFAS_CLASSES,
    BackboneError,
    available_backbones,
    create_backbone,
    load_state_dict,
)
from worker.embedder import Embedder

RESNET_FILES = {
    arch: os.path.basename(getattr(torchvision.models, weights).IMAGENET1K_V1.url)
    for arch, weights in (("resnet18", "ResNet18_Weights"), ("resnet50", "ResNet50_Weights"))
}


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TORCH_HOME in a temp folder; `torch.hub.get_dir()` reads it unless `set_dir` was called."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert Path(torch.hub.get_dir()) == checkpoints.parent
    checkpoints.mkdir(parents=True)
    return checkpoints


@pytest.fixture(scope="module")
def cefas_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    torch.manual_seed(0)
    state = torchvision.models.resnet50(weights=None, num_classes=3).state_dict()
    folder = tmp_path_factory.mktemp("cefas")
    bare, wrapped, wrong = folder / "bare.pth", folder / "wrapped.pth", folder / "five.pth"
    torch.save(state, bare)
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}}, wrapped)
    torch.save(torchvision.models.resnet50(weights=None, num_classes=5).state_dict(), wrong)
    return {"bare": bare, "wrapped": wrapped, "wrong": wrong}


def forward(backbone, size: int, n: int = 1):
    torch.manual_seed(1)
    with torch.inference_mode():
        return backbone.model(torch.randn(n, 3, size, size))


def test_available_backbones():
    assert available_backbones() == ["efficientnet-lite0", "resnet18", "resnet50", "resnet50-cefas"]


def test_unknown_name_lists_choices():
    with pytest.raises(BackboneError) as exc:
        create_backbone("vgg16")
    message = str(exc.value)
    assert "'vgg16'" in message
    for name in available_backbones():
        assert name in message


def test_efficientnet_lite0_offline_any_size():
    backbone = create_backbone("efficientnet-lite0")
    assert backbone.embedding_dim == 1280
    assert not backbone.model.training
    assert backbone.class_names == ()
    for size, n in ((224, 1), (97, 2)):
        features, logits = forward(backbone, size, n)
        assert features.shape == (n, 1280)
        assert logits is None
        assert torch.isfinite(features).all()
        assert features.abs().sum() > 0


@pytest.mark.parametrize(("arch", "dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_imagenet_weights_from_torch_home(torch_home: Path, arch: str, dim: int):
    torch.manual_seed(2)
    state = getattr(torchvision.models, arch)(weights=None).state_dict()
    torch.save(state, torch_home / RESNET_FILES[arch])
    backbone = create_backbone(arch)
    assert backbone.name == arch and backbone.embedding_dim == dim
    loaded = backbone.model.body.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key
    features, logits = forward(backbone, 32)
    assert features.shape == (1, dim) and logits is None


def test_resnet_weights_override(tmp_path: Path, torch_home: Path):
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "mine.pth"
    torch.save({"model_state_dict": state}, path)
    backbone = create_backbone("resnet18", weights=str(path))  # TORCH_HOME holds nothing
    assert torch.equal(backbone.model.body.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_resnet_missing_weights_name_the_path(torch_home: Path, arch: str):
    expected = torch_home / RESNET_FILES[arch]
    with pytest.raises(BackboneError) as exc:
        create_backbone(arch)
    assert str(expected) in str(exc.value)
    assert "TORCH_HOME" in str(exc.value)


@pytest.mark.parametrize("kind", ["bare", "wrapped"])
def test_cefas_features_and_head(cefas_weights: dict[str, Path], kind: str):
    state = torch.load(cefas_weights["bare"], weights_only=True)
    backbone = create_backbone("resnet50-cefas", weights=str(cefas_weights[kind]))
    assert backbone.embedding_dim == 2048
    assert backbone.class_names == CEFAS_CLASSES
    assert torch.equal(backbone.model.head.weight, state["fc.weight"])
    assert torch.equal(backbone.model.body.conv1.weight, state["conv1.weight"])
    features, logits = forward(backbone, 32)
    assert features.shape == (1, 2048)
    assert logits.shape == (1, 3)
    probs = torch.softmax(logits, dim=1)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-5)
    # The embedder recomputes the same probabilities from stored features.
    embedder = Embedder(backbone, torch.device("cpu"), 32, batch_size=2)
    from_features = embedder.head_probabilities(features.numpy())
    assert from_features.shape == (1, 3)
    assert from_features.sum() == pytest.approx(1.0, abs=1e-5)
    assert from_features == pytest.approx(probs.numpy(), abs=1e-4)


def test_cefas_wrong_head_size(cefas_weights: dict[str, Path]):
    with pytest.raises(BackboneError, match="3-class head"):
        create_backbone("resnet50-cefas", weights=str(cefas_weights["wrong"]))


@pytest.mark.parametrize("weights", [None, ""])
def test_cefas_needs_weights(weights):
    with pytest.raises(BackboneError, match="WEIGHTS"):
        create_backbone("resnet50-cefas", weights=weights)


def test_cefas_missing_file(tmp_path: Path):
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("resnet50-cefas", weights=str(tmp_path / "nope.pth"))


def test_load_state_dict_errors(tmp_path: Path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="cannot read weights file"):
        load_state_dict(garbage)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(BackboneError, match="holds no state dict"):
        load_state_dict(listed)
    with pytest.raises(BackboneError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pth")


def test_load_state_dict_strips_module_prefix(tmp_path: Path):
    path = tmp_path / "wrapped.pth"
    torch.save({"model": {"module.a.weight": torch.ones(2), "b": torch.zeros(1)}}, path)
    state = load_state_dict(path)
    assert set(state) == {"a.weight", "b"}
    assert torch.equal(state["a.weight"], torch.ones(2))
