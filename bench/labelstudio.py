"""Label Studio at project scale: push 10,000 tasks with predictions, refresh their predictions to a new
champion, sync 10,000 annotations.

Targets (issue 7): push <= 15 s, sync <= 30 s. Runs against the Label Studio in the settings (FLYWHEEL_*
environment; `make test` starts one on 18080: FLYWHEEL_LABEL_STUDIO__PORT=18080). Images are real
Fashion-MNIST PNGs so the data manager shows them; the annotations are seeded the fast way (tasks imported
with their annotation), then read back by `sync_annotations` (export snapshot) into a fresh catalog.

    .venv/bin/python bench/labelstudio.py [--tasks 10000] [--annotations 10000] [--screenshot docs/x.png]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import cast

import numpy as np
from label_studio_sdk import ImportApiRequest

from flywheel.catalog import Catalog
from flywheel.config import load_settings
from flywheel.labelstudio import (
    TaskToPush,
    choice_result,
    connect,
    ensure_project,
    image_url,
    push_tasks,
    refresh_predictions,
)
from flywheel.labelstudio.sync import export_annotated, sync_annotations
from flywheel.sources.importing import FASHION_MNIST_CLASSES, import_source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks pushed with predictions (timed)")
    parser.add_argument("--annotations", type=int, default=10_000, help="annotations synced (timed)")
    parser.add_argument("--screenshot", type=Path, help="also save the data manager as a PNG here (Chromium)")
    parser.add_argument("--keep", action="store_true", help="leave the Label Studio project in place")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()

    workspace = Path(tempfile.mkdtemp(prefix="flywheel-bench-ls-"))
    settings = load_settings(workspace=workspace, project=f"bench-{os.urandom(3).hex()}")
    catalog = Catalog(settings.catalog_url)
    began = time.monotonic()
    import_source(catalog, settings, "fashion-mnist", pool_size=args.tasks + args.annotations, test_size=1)
    samples = catalog.samples()
    print(f"{len(samples)} Fashion-MNIST samples in the catalog ({time.monotonic() - began:.0f} s, not timed)")
    client = connect(settings)
    project_id = ensure_project(client, settings, catalog, catalog.classes())
    rng = np.random.default_rng(0)
    figures: dict[str, float | int | str] = {"label_studio": settings.label_studio.url}
    try:
        to_push, to_annotate = samples[: args.tasks], samples[args.tasks :]
        tasks = [
            TaskToPush(s.id, s.uri, str(rng.choice(FASHION_MNIST_CLASSES)), 0.5, float(rng.random())) for s in to_push
        ]
        began = time.monotonic()
        pushed = push_tasks(client, catalog, settings, project_id, tasks, model_version="1", round_id=None)
        figures["push_tasks"], figures["push_s"] = len(pushed), round(time.monotonic() - began, 1)
        print(f"push: {len(pushed)} tasks with predictions in {figures['push_s']} s (target <= 15 s)")

        began = time.monotonic()  # a new champion: every pushed task is still open
        predicted = {s.id: str(rng.choice(FASHION_MNIST_CLASSES)) for s in to_push}
        refreshed = refresh_predictions(client, catalog, project_id, predicted, model_version="2")
        figures["refresh_tasks"], figures["refresh_s"] = refreshed, round(time.monotonic() - began, 1)
        print(f"refresh: {refreshed} open tasks to the new champion's predictions in {figures['refresh_s']} s")

        began = time.monotonic()
        for start in range(0, len(to_annotate), 5000):
            annotated = [
                {
                    "data": {"image": image_url(s.uri, settings), "sample_id": s.id},
                    "annotations": [{"result": choice_result(s.truth or FASHION_MNIST_CLASSES[0])}],
                }
                for s in to_annotate[start : start + 5000]
            ]
            # the SDK types the request as its models, and sends these dicts as they are
            client.projects.import_tasks(project_id, request=cast(list[ImportApiRequest], annotated))
        print(f"seeded {len(to_annotate)} annotated tasks in {time.monotonic() - began:.1f} s (not timed)")

        began = time.monotonic()
        exported = export_annotated(client, project_id)
        figures["export_s"] = round(time.monotonic() - began, 1)
        n_annotations = sum(len(t.get("annotations") or []) for t in exported)
        print(f"export snapshot alone: {len(exported)} tasks, {n_annotations} annotations in {figures['export_s']} s")

        began = time.monotonic()
        report = sync_annotations(client, catalog, project_id, export_above=settings.label_studio.export_above)
        figures["sync_labels"], figures["sync_s"] = report.new, round(time.monotonic() - began, 1)
        figures["sync_mode"] = report.mode
        print(f"sync: {report.new} new labels ({report.mode}) in {figures['sync_s']} s (target <= 30 s)")
        labels = catalog.labels()
        lost = sum(1 for s in to_annotate if labels.get(s.id) != s.truth)
        figures["labels_lost_or_wrong"] = lost
        began = time.monotonic()
        again = sync_annotations(client, catalog, project_id, export_above=settings.label_studio.export_above)
        figures["resync_s"] = round(time.monotonic() - began, 1)
        print(f"sync again: {again.new} new, {again.unchanged} unchanged in {figures['resync_s']} s; lost: {lost}")
        if args.screenshot:
            from bench.screenshot import data_manager_screenshot

            data_manager_screenshot(settings, project_id, args.screenshot)
            print(f"screenshot: {args.screenshot}")
    finally:
        if not args.keep:
            client.projects.delete(project_id)
    figures["load_average_1min"] = round(os.getloadavg()[0], 1)  # other work on the machine slows Label Studio
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
