"""The champion's answers, fast: pool images are scored from their cached vectors by the champion's head (no
forward pass), any other image through the champion's own body. The champion is reloaded when the registry's
`champion` alias moves, so a promotion reaches every caller within `recheck_s`."""

from __future__ import annotations

import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from mlflow import MlflowClient

from flywheel.config import Settings
from flywheel.errors import DataError
from flywheel.features.backbones import Classifier, get_spec
from flywheel.features.store import EmbeddingStore
from flywheel.loop.state import model_features_version
from flywheel.registry import tracking
from flywheel.training.finetune import predict_proba as image_proba
from flywheel.training.head import predict_proba as head_proba

MAX_DOWNLOAD = 50 * 1024 * 1024  # bytes of one image fetched over http(s)


@dataclass(frozen=True)
class Champion:
    version: str
    classifier: Classifier
    store: EmbeddingStore  # the pool's vectors for the features the champion's head reads

    @property
    def classes(self) -> list[str]:
        return list(self.classifier.classes)


class ChampionSource:
    """The project's current champion, loaded once and again only when the alias points elsewhere."""

    def __init__(self, settings: Settings, *, recheck_s: float = 5.0):
        self._settings, self._recheck_s = settings, recheck_s
        self._client: MlflowClient | None = None  # connected on first use: the server may start later
        self._champion: Champion | None = None
        self._checked_at = float("-inf")
        self._lock = threading.Lock()

    def current(self) -> Champion | None:
        """None while the project has no champion."""
        with self._lock:
            if time.monotonic() - self._checked_at >= self._recheck_s:
                self._client = self._client or tracking.connect(self._settings)
                version = tracking.champion_version(self._client, self._settings)
                if version is None:
                    self._champion = None
                elif self._champion is None or self._champion.version != version:
                    self._champion = self._load(version)
                self._checked_at = time.monotonic()
            return self._champion

    def _load(self, version: str) -> Champion:
        settings = self._settings
        classifier = tracking.load_classifier(settings.mlflow.url, settings.registered_model_name, version)
        assert self._client is not None  # connected by current()
        features = model_features_version(tracking.model_version(self._client, settings, version))
        key = EmbeddingStore.key_for(get_spec(classifier.backbone), features, classifier.image_size)
        return Champion(version, classifier.eval(), EmbeddingStore(settings.dirs.embeddings, key))


def predict(champion: Champion, sample_ids: Sequence[int | None], locations: Sequence[str]) -> npt.NDArray[np.float32]:
    """(N, C) class probabilities, row i for image i: from the cached vector of sample_ids[i] when there is
    one, else from the image at locations[i] (a path or an http(s) URL) through the champion's body."""
    probs = np.empty((len(locations), len(champion.classes)), dtype=np.float32)
    known = {k: sid for k, sid in enumerate(sample_ids) if sid is not None}
    absent = set(champion.store.missing(list(known.values())))
    cached = [k for k, sid in known.items() if sid not in absent]
    if cached:
        probs[cached] = head_proba(champion.classifier.head, champion.store.get([known[k] for k in cached]))
    rest = sorted(set(range(len(locations))) - set(cached))
    if rest:
        with tempfile.TemporaryDirectory(prefix="flywheel-predict-") as folder:
            paths = [local_copy(locations[k], Path(folder)) for k in rest]
            probs[rest] = image_proba(champion.classifier, paths, device="cpu")
    return probs


def local_copy(location: str, folder: Path) -> str:
    """A path to read the image from: itself when local, else a download into `folder` (at most MAX_DOWNLOAD)."""
    if not location.startswith(("http://", "https://")):
        return location
    target = folder / f"{len(list(folder.iterdir()))}.img"
    try:
        with urllib.request.urlopen(location, timeout=30) as response:  # http(s) only, checked above
            data = response.read(MAX_DOWNLOAD + 1)
    except OSError as exc:
        raise DataError(f"image {location}: cannot download it ({exc})") from exc
    if len(data) > MAX_DOWNLOAD:
        raise DataError(f"image {location}: larger than {MAX_DOWNLOAD} bytes")
    target.write_bytes(data)
    return str(target)
