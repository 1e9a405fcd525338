"""The quarantine: files kept out of the pool, with the reason, instead of stopping an import or a round.

Where files are quarantined (rows of the catalog's `quarantine` table):
- import: empty, not an image, or above settings.max_image_pixels (header checks, data.import_records);
  exact duplicates by content hash (catalog.add_samples).
- embed: images that fail to decode, truncated ones included (embedded.split_features via
  embed.embed_available), so the round goes on with the others.
- select: near-duplicates, i.e. a selected sample whose embedding has cosine >= settings.near_duplicate_cosine
  with a sample already labelled or sent, or with a better-ranked pick of the same round (`drop_near_duplicates`):
  it is not sent to Label Studio.

`write_report` rewrites `<workspace>/reports/quarantine.csv` from the table; the round report carries its
summary (count per reason and the path).
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from flywheel.atomic import atomic_path
from flywheel.catalog import Catalog, Quarantined
from flywheel.config import Settings
from flywheel.features import embedded
from flywheel.index.sharded import ShardedIndex

NEAR_DUPLICATE = "near duplicate"
REPORT_COLUMNS = ("uri", "reason", "stage", "sample_id", "duplicate_of", "created_at", "detail")


@dataclass(frozen=True)
class QuarantineSummary:
    total: int
    by_reason: dict[str, int]
    report: str  # path of the CSV


def report_path(settings: Settings) -> Path:
    return settings.workspace / "reports" / "quarantine.csv"


def write_report(settings: Settings, catalog: Catalog) -> QuarantineSummary:
    """Rewrite the quarantine CSV (atomically) from the catalog and summarise it."""
    rows = catalog.quarantined()
    path = report_path(settings)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(REPORT_COLUMNS)
        for row in rows:
            writer.writerow([row.uri, row.reason, row.stage, row.sample_id or "", row.duplicate_of or "",
                             row.created_at.isoformat(timespec="seconds"), row.detail])  # fmt: skip
    return QuarantineSummary(len(rows), dict(Counter(row.reason for row in rows)), str(path))


def near_duplicates(
    index: ShardedIndex,
    vectors: npt.NDArray[np.floating[Any]],
    picked: Sequence[int],
    known: set[int],
    min_cosine: float,
) -> dict[int, tuple[int, float]]:
    """Picked sample id -> (the sample it nearly duplicates, cosine), for each pick with a neighbour at
    cosine >= min_cosine that is `known` (labelled or sent) or a better-ranked pick that was kept.

    vectors: (len(picked), D), the picks' embeddings, best-ranked first; `index` holds the pool by sample id.
    """
    kept: set[int] = set()
    out: dict[int, tuple[int, float]] = {}
    for sample_id, (ids, scores) in zip(picked, index.radius_search(vectors, min_cosine), strict=True):
        twin = next(
            (
                (int(o), float(s))
                for o, s in zip(ids, scores, strict=True)
                if o != sample_id and (o in known or o in kept)
            ),
            None,
        )
        if twin is None:
            kept.add(int(sample_id))
        else:
            out[int(sample_id)] = twin
    return out


def drop_near_duplicates(
    settings: Settings,
    catalog: Catalog,
    pool: embedded.SplitFeatures,
    positions: npt.NDArray[np.integer[Any]],
    known: set[int],
) -> tuple[npt.NDArray[np.bool_], list[dict[str, int | float]]]:
    """A mask over `positions` (pool rows, best first) of the picks to keep; the others are quarantined as
    near-duplicates and returned as report rows. The question goes to the pool's saved index (the one
    bootstrap and promotions write), brought up to date first when samples were imported since."""
    index = embedded.pool_index(settings, catalog, pool)
    picked = [int(pool.ids[p]) for p in positions]
    twins = near_duplicates(index, pool.vectors[positions], picked, known, settings.near_duplicate_cosine)
    released = catalog.released_duplicates() if twins else set()
    twins = {s: twin for s, twin in twins.items() if s not in released}  # a person said: not a duplicate
    if twins:
        uri = dict(zip((int(i) for i in pool.ids), pool.paths, strict=True))
        catalog.quarantine_samples(
            {s: Quarantined(uri[s], NEAR_DUPLICATE, f"cosine {c:.4f} to sample {o}") for s, (o, c) in twins.items()},
            stage="select",
            duplicate_of={s: o for s, (o, _) in twins.items()},
        )
    keep = np.array([s not in twins for s in picked], dtype=bool)
    return keep, [{"sample_id": s, "duplicate_of": o, "cosine": round(c, 4)} for s, (o, c) in twins.items()]
