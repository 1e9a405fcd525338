"""Which body embeds the pool now, and the cached embeddings it produced per split.

The body is the ImageNet-pretrained backbone until a fine-tuned model is promoted; from then on the
champion's body. Embeddings are cached per (backbone, body version, image size), so switching body never
mixes vectors from two feature spaces.

The backbone is the project's: the one it was first embedded with, wherever a command runs from, until the
settings name another one (in a flywheel.toml, FLYWHEEL_BACKBONE or an argument), which moves the project
there with a warning (the pool is embedded anew). A promoted fine-tune that started from another candidate
that transferred better (loop.run_finetune), or a model of another backbone promoted by hand, moves it too:
then the project runs on that backbone for as long as the configuration names the same one as then.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from torch import nn

from flywheel.catalog import Catalog, Quarantined
from flywheel.config import Settings
from flywheel.errors import BadImageError, DataError
from flywheel.features.backbones import build_body, get_spec
from flywheel.features.pipeline import Embedder
from flywheel.features.store import EmbeddingStore, ProgressFn, embed_available, resolve_device
from flywheel.index.sharded import ShardedIndex, sync_vector_index
from flywheel.registry import tracking

IMAGENET = "imagenet"
BODY_KEY = "body"  # catalog meta: {"backbone": ..., "version": "imagenet" | MLflow model version}
BACKBONE_KEY = "backbone"  # catalog meta: {"configured": settings.backbone then, "in_use": the project's now}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitFeatures:
    """One split's samples, aligned row by row with their embeddings."""

    ids: npt.NDArray[np.int64]  # (N,) sample ids
    paths: list[str]
    truths: list[str | None]
    folds: npt.NDArray[np.int64]  # (N,)
    vectors: npt.NDArray[np.float32]  # (N, D)


def active_settings(settings: Settings, catalog: Catalog) -> Settings:
    """`settings` with the backbone the project runs on now (see the module docstring)."""
    record = _backbone_record(catalog)
    if record is None:  # the project's first use fixes its backbone
        record_backbone(catalog, configured=settings.backbone, in_use=settings.backbone)
        return settings
    if settings.backbone == record["in_use"]:
        return settings
    configured = configured_backbone(settings, catalog)
    if configured == record["configured"]:
        return settings.model_copy(update={"backbone": record["in_use"]})
    log.warning(
        "project %s: settings.backbone moves it from %s to %s; the pool is embedded anew with %s",
        settings.project, record["in_use"], configured, configured,
    )  # fmt: skip
    record_backbone(catalog, configured=configured, in_use=configured)
    return settings


def configured_backbone(settings: Settings, catalog: Catalog) -> str:
    """The backbone the user chose: settings.backbone when something set it (file, environment, argument),
    else the one the project was set up with (a default never moves a project)."""
    record = _backbone_record(catalog)
    if record is None or "backbone" in settings.model_fields_set:
        return settings.backbone
    return record["configured"]


def record_backbone(catalog: Catalog, *, configured: str, in_use: str) -> None:
    """Remember that the project runs on `in_use` while the configuration says `configured`."""
    catalog.set_meta(BACKBONE_KEY, json.dumps({"configured": configured, "in_use": in_use}))


def _backbone_record(catalog: Catalog) -> dict[str, str] | None:
    stored = catalog.get_meta(BACKBONE_KEY)
    if not stored:
        return None
    record: dict[str, str] = json.loads(stored)
    return record


def body_version(settings: Settings, catalog: Catalog) -> str:
    stored = catalog.get_meta(BODY_KEY)
    if stored:
        body = json.loads(stored)
        if body["backbone"] == settings.backbone:
            return str(body["version"])
    return IMAGENET


def features_version(body_version: str, stage: str) -> str:
    """The cache key of a pool's vectors: the body's version, and the stage when it is not the last."""
    return body_version if stage == "last" else f"{body_version}+{stage}"


def set_body_version(settings: Settings, catalog: Catalog, version: str) -> None:
    catalog.set_meta(BODY_KEY, json.dumps({"backbone": settings.backbone, "version": version}))


def load_body(settings: Settings, version: str) -> nn.Module:
    if version == IMAGENET:
        return build_body(settings.backbone, pretrained=True)
    return tracking.load_classifier(settings.mlflow.url, settings.registered_model_name, version).body


def split_features(
    settings: Settings,
    catalog: Catalog,
    split: str,
    body: nn.Module,
    version: str,
    *,
    progress: bool = True,
    on_progress: ProgressFn | None = None,
) -> SplitFeatures:
    """Embeddings of every sample of a split, computing only the ones not cached yet; images that cannot be
    decoded are quarantined and left out."""
    rows = catalog.samples(split)
    spec = get_spec(settings.backbone)
    store = EmbeddingStore(settings.dirs.embeddings, EmbeddingStore.key_for(spec, version, settings.image_size))
    ids = np.array([r.id for r in rows], dtype=np.int64)
    paths = [r.uri for r in rows]
    bad: dict[int, BadImageError] = {}
    vectors, _ = embed_available(
        store,
        ids.tolist(),
        paths,
        Embedder.configured(body, settings, device=resolve_device(settings.finetune.device)),
        on_bad=bad.__setitem__,
        progress=progress,
        on_progress=on_progress,
    )
    if bad:  # undecodable images leave the pool (flywheel.sources.quarantine) instead of stopping the round
        catalog.quarantine_samples({i: Quarantined(e.path, e.reason, e.detail) for i, e in bad.items()}, stage="embed")
        rows = [r for r in rows if r.id not in bad]
        ids, paths = np.array([r.id for r in rows], dtype=np.int64), [r.uri for r in rows]
    return SplitFeatures(
        ids=ids,
        paths=paths,
        truths=[r.truth for r in rows],
        folds=np.array([r.fold for r in rows], dtype=np.int64),
        vectors=vectors,
    )


def split_fingerprint(settings: Settings, catalog: Catalog, split: str) -> str:
    """Everything a split's embeddings depend on, hashed: the store key (backbone, weights, body version, image
    size) and every sample's (id, uri). Equal fingerprints mean there is nothing new to embed."""
    settings = active_settings(settings, catalog)
    key = EmbeddingStore.key_for(get_spec(settings.backbone), body_version(settings, catalog), settings.image_size)
    digest = hashlib.sha256(key.encode())
    for row in catalog.samples(split):
        digest.update(f"\n{row.id}\t{row.uri}".encode())
    return digest.hexdigest()


def embed_split(
    settings: Settings, catalog: Catalog, split: str, *, on_progress: ProgressFn | None = None
) -> SplitFeatures:
    """A split embedded by the body in use now; only samples without a stored vector cost a forward pass."""
    settings = active_settings(settings, catalog)
    version = body_version(settings, catalog)
    body = load_body(settings, version)
    return split_features(settings, catalog, split, body, version, progress=False, on_progress=on_progress)


def index_path(settings: Settings, version: str) -> Path:
    """The pool's index directory (flywheel.index.sharded: manifest + shards) for one body."""
    return settings.workspace / "index" / f"{settings.backbone}-{version}-{settings.image_size}"


def pool_index(settings: Settings, catalog: Catalog, pool: SplitFeatures) -> ShardedIndex:
    """The saved index of the body in use, holding at least `pool`: samples imported since are added (and
    their shard saved). Ids it holds beyond the pool (quarantined since) stay: a neighbour query skips them, and
    dropping them would mean a rebuild; bootstrap and promotions rebuild (`rebuild_index`)."""
    settings = active_settings(settings, catalog)
    path = index_path(settings, body_version(settings, catalog))
    try:
        index = ShardedIndex.load(path, settings.index)
    except DataError as exc:  # none yet, or damaged (CorruptFileError included): build it
        log.info("index %s cannot be used (%s); building it", path, exc)
        return sync_vector_index(path, pool.vectors, pool.ids, settings.index, seed=settings.seed)[0]
    new = ~np.isin(pool.ids, index.ids)
    if new.any():
        index.add(pool.vectors[new], pool.ids[new])
        index.save(path)
    return index


def rebuild_index(settings: Settings, pool: SplitFeatures, version: str) -> Path:
    """Bring the pool's FAISS index up to date: new samples are added to the saved index (changed shards
    rewritten, then the manifest), and it is rebuilt when the kind settings.index plans for the pool's size
    changes or samples left. A new body gets a new directory, so the old index serves until the switch."""
    path = index_path(settings, version)
    sync_vector_index(path, pool.vectors, pool.ids, settings.index, seed=settings.seed)
    return path
