"""A catalog whose whole pool is labelled: fine-tune tests need labels, not a Label Studio round."""

from __future__ import annotations

from flywheel.catalog import Catalog
from flywheel.config import Settings
from flywheel.sources.importing import import_source


def labelled_catalog(settings: Settings, *, pool_size: int = 200, test_size: int = 100) -> Catalog:
    """Fashion-MNIST imported into the settings' catalog, every pool sample labelled with its truth."""
    catalog = Catalog(settings.catalog_url)
    import_source(catalog, settings, "fashion-mnist", pool_size=pool_size, test_size=test_size)
    truth = catalog.truth_of(int(s.id) for s in catalog.samples())
    with catalog.transaction() as session:
        for sample_id, label in truth.items():
            assert label is not None  # Fashion-MNIST samples all have their truth
            catalog.upsert_label(session, sample_id=sample_id, label=label, annotator="test", ls_annotation_id=None)
    return catalog
