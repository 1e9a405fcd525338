"""The labels taken away, as the catalog holds them: an ImageFolder tree, CSV, JSON Lines, a COCO
classification file or a Hugging Face `datasets` folder (images embedded, one split per catalog split), each
row with its split, annotators, agreement and provenance (the round that asked for it, where the label came
from, its review)."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from flywheel.catalog import Catalog
from flywheel.errors import DataError
from flywheel.insight.provenance import provenance_of
from flywheel.labelstudio.interface import LabelMode
from flywheel.labelstudio.ledger import agreement
from flywheel.sources.images import read_header

ExportFormat = Literal["imagefolder", "csv", "jsonl", "coco", "hf"]
FORMATS: tuple[ExportFormat, ...] = ("imagefolder", "csv", "jsonl", "coco", "hf")


@dataclass(frozen=True)
class LabelRow:
    sample_id: int
    uri: str
    label: str
    split: str
    annotators: str  # ";"-joined: whose annotations count now
    agreement: float | None  # share of votes for the label; None with fewer than two annotators
    label_origin: str  # labelstudio | import
    round_id: int | None  # the round that asked for it (None: imported with its label)
    review_status: str  # confirmed | corrected | open, or empty when never flagged
    content_hash: str


def label_rows(
    catalog: Catalog, *, mode: LabelMode, only_reviewed: bool = False, min_agreement: float | None = None
) -> list[LabelRow]:
    """Every labelled sample, in id order; `only_reviewed` keeps labels a reviewer confirmed or corrected,
    `min_agreement` those that two or more annotators gave with at least that share of the votes."""
    labels = catalog.labels()
    agreed = agreement(catalog, mode=mode).per_task
    rows = []
    for sample_id, record in sorted(provenance_of(catalog, labels).items()):
        review = (record.review or {}).get("status", "")
        share = agreed.get(sample_id)
        if only_reviewed and review not in ("confirmed", "corrected"):
            continue
        if min_agreement is not None and (share is None or share < min_agreement):
            continue
        rows.append(
            LabelRow(
                sample_id, record.uri, labels[sample_id], record.split, ";".join(record.annotators), share,
                record.label_origin or "", record.round_id, review, record.content_hash,
            )
        )  # fmt: skip
    return rows


def write_export(rows: Sequence[LabelRow], out: Path, fmt: ExportFormat) -> Path:
    """Write the rows in `fmt` under `out` (created); returns the main file or folder written."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "imagefolder":
        _copy_tree(rows, out)
        return _write_csv(rows, out / "labels.csv").parent
    if fmt == "csv":
        return _write_csv(rows, out / "labels.csv")
    if fmt == "hf":
        return _write_hf(rows, out / "hf")
    if fmt == "jsonl":
        target = out / "labels.jsonl"
        target.write_text("".join(json.dumps(asdict(r)) + "\n" for r in rows))
        return target
    target = out / "coco.json"
    target.write_text(json.dumps(coco(rows), indent=1))
    return target


def _write_csv(rows: Sequence[LabelRow], target: Path) -> Path:
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(LabelRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in asdict(r).items()} for r in rows)
    return target


def _local_file(row: LabelRow) -> Path:
    source = Path(row.uri.removeprefix("file://"))
    if not source.is_file():
        raise DataError(f"sample {row.sample_id}: {row.uri} is not a local file; export csv or jsonl instead")
    return source


def _copy_tree(rows: Sequence[LabelRow], out: Path) -> None:
    """<split>/<label>/<sample id>-<file name>: each split folder imports back with `--trust-labels`."""
    for r in rows:
        source = _local_file(r)
        folder = out / r.split / r.label
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, folder / f"{r.sample_id}-{source.name}")


def _write_hf(rows: Sequence[LabelRow], target: Path) -> Path:
    """A `datasets.DatasetDict` saved to `target` (`datasets.load_from_disk` reads it): the image bytes embedded,
    `label` a ClassLabel over every exported class, the other columns as in the CSV."""
    try:
        import datasets  # the optional `hf` extra; pandas and pyarrow come with it
    except ImportError as exc:
        raise DataError("--format hf needs the `hf` extra: pip install 'flywheel[hf]'") from exc
    datasets.disable_progress_bars()
    classes = sorted({r.label for r in rows})
    columns: dict[str, Any] = {name: datasets.Value("string") for name in LabelRow.__dataclass_fields__}
    columns |= {"sample_id": datasets.Value("int64"), "agreement": datasets.Value("float64")}
    columns |= {"round_id": datasets.Value("int64"), "label": datasets.ClassLabel(names=classes)}
    features = datasets.Features({"image": datasets.Image(), **columns})
    splits = {}
    for split in sorted({r.split for r in rows}):
        chosen = [r for r in rows if r.split == split]
        table = {name: [getattr(r, name) for r in chosen] for name in LabelRow.__dataclass_fields__}
        files = [_local_file(r) for r in chosen]
        table["image"] = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
        splits[split] = datasets.Dataset.from_dict(table, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(target))
    return target


def coco(rows: Sequence[LabelRow]) -> dict[str, object]:
    """A COCO file for classification: one image-level annotation (no box) per image."""
    classes = sorted({r.label for r in rows})
    category = {name: k + 1 for k, name in enumerate(classes)}
    images, annotations = [], []
    for k, r in enumerate(rows, start=1):
        header = read_header(r.uri.removeprefix("file://")) if not r.uri.startswith(("http", "s3")) else None
        width, height = (header.width, header.height) if header else (0, 0)
        images.append({"id": k, "file_name": r.uri, "width": width, "height": height, "split": r.split})
        annotations.append(
            {"id": k, "image_id": k, "category_id": category[r.label], "annotators": r.annotators,
             "agreement": r.agreement, "label_origin": r.label_origin, "round_id": r.round_id}
        )  # fmt: skip
    return {
        "info": {"description": "flywheel labels", "date_created": datetime.now(UTC).isoformat(), "version": "1.0"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": category[name], "name": name, "supercategory": ""} for name in classes],
    }
