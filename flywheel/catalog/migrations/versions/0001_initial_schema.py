"""Initial schema: the catalog's tables as they were when alembic took over.

Also adopts a catalog made before alembic (tables from SQLAlchemy's create_all at some earlier version, no
alembic_version): tables it lacks are created, columns added since (rounds.finished_at, annotations.ls_user_id)
are added to its tables, rows are kept, and rounds that existed count as finished.

Revision ID: 0001
Revises:
Create Date: 2026-11-25 23:32:49.214841
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from flywheel.errors import DataError

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _table(name: str, *elements: sa.Column[Any] | sa.Constraint, backfill: dict[str, str] | None = None) -> None:
    """Create the table; where an older catalog has it, add the columns it lacks (filled from `backfill`'s
    column when named there)."""
    if op.get_context().as_sql:  # `--sql`: the script for a new database, nothing to inspect
        op.create_table(name, *elements)
        return
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table(name):
        op.create_table(name, *elements)
        return
    have = {column["name"] for column in inspector.get_columns(name)}
    for column in elements:
        if isinstance(column, sa.Column) and column.name not in have:
            if not column.nullable:
                raise DataError(f"catalog table {name} lacks {column.name}, which cannot be added without a value")
            op.add_column(name, column)
            if backfill and column.name in backfill:
                op.execute(f"UPDATE {name} SET {column.name} = {backfill[column.name]}")


def _index(table: str, name: str, column: str) -> None:
    if op.get_context().as_sql or name not in {i["name"] for i in sa.inspect(op.get_bind()).get_indexes(table)}:
        op.create_index(name, table, [column], unique=False)


def upgrade() -> None:
    _table(
        "classes",
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
        sa.UniqueConstraint("position"),
    )
    _table(
        "meta",
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("value", sa.String(length=2048), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    _table(
        "rounds",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("strategy", sa.String(length=64), nullable=False),
        sa.Column("n_labels", sa.Integer(), nullable=False),
        sa.Column("n_selected", sa.Integer(), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("holdout_accuracy", sa.Float(), nullable=True),
        sa.Column("test_accuracy", sa.Float(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        backfill={"finished_at": "started_at"},
    )
    _table(
        "samples",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uri", sa.String(length=2048), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("source", sa.String(length=256), nullable=False),
        sa.Column("split", sa.String(length=8), nullable=False),
        sa.Column("truth", sa.String(length=256), nullable=True),
        sa.Column("fold", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("uri"),
    )
    _index("samples", "ix_samples_content_hash", "content_hash")
    _index("samples", "ix_samples_split", "split")
    _table(
        "webhook_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("ls_project_id", sa.Integer(), nullable=True),
        sa.Column("ls_annotation_ids", sa.Text(), nullable=False),
        sa.Column("body_sha256", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("emitted", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("webhook_events", "ix_webhook_events_body_sha256", "body_sha256")
    _table(
        "annotations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ls_annotation_id", sa.Integer(), nullable=False),
        sa.Column("ls_task_id", sa.Integer(), nullable=True),
        sa.Column("ls_project_id", sa.Integer(), nullable=True),
        sa.Column("sample_id", sa.Integer(), nullable=True),
        sa.Column("ls_user_id", sa.Integer(), nullable=True),
        sa.Column("annotator", sa.String(length=256), nullable=False),
        sa.Column("choices", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("problem", sa.Text(), nullable=True),
        sa.Column("ls_updated_at", sa.DateTime(), nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("ls_annotation_id"),
    )
    _index("annotations", "ix_annotations_ls_project_id", "ls_project_id")
    _index("annotations", "ix_annotations_ls_task_id", "ls_task_id")
    _index("annotations", "ix_annotations_sample_id", "sample_id")
    _table(
        "forecasts",
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("forecast", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"]),
        sa.PrimaryKeyConstraint("round_id"),
    )
    _table(
        "label_history",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=1024), nullable=True),
        sa.Column("previous", sa.String(length=1024), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=False),
        sa.Column("votes", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    _index("label_history", "ix_label_history_sample_id", "sample_id")
    _table(
        "label_reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("ls_project_id", sa.Integer(), nullable=False),
        sa.Column("ls_task_id", sa.Integer(), nullable=False),
        sa.Column("reasons", sa.Text(), nullable=False),
        sa.Column("label_before", sa.String(length=1024), nullable=False),
        sa.Column("suggested", sa.String(length=1024), nullable=False),
        sa.Column("self_confidence", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("label_after", sa.String(length=1024), nullable=True),
        sa.Column("reviewer", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("resolved_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"]),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("ls_task_id"),
        sa.UniqueConstraint("sample_id"),
    )
    _index("label_reviews", "ix_label_reviews_status", "status")
    _table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.String(length=256), nullable=False),
        sa.Column("annotator", sa.String(length=256), nullable=False),
        sa.Column("origin", sa.String(length=32), nullable=False),
        sa.Column("ls_annotation_id", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("ls_annotation_id"),
        sa.UniqueConstraint("sample_id"),
    )
    _table(
        "provenance",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("strategy", sa.String(length=64), nullable=True),
        sa.Column("params", sa.Text(), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=True),
        sa.Column("selected_at", sa.DateTime(), nullable=True),
        sa.Column("annotations", sa.Text(), nullable=True),
        sa.Column("first_annotated_at", sa.DateTime(), nullable=True),
        sa.Column("lead_time_s", sa.Float(), nullable=True),
        sa.Column("annotations_read_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"]),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sample_id"),
    )
    _index("provenance", "ix_provenance_round_id", "round_id")
    _table(
        "quarantine",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uri", sa.String(length=2048), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=True),
        sa.Column("sample_id", sa.Integer(), nullable=True),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("stage", sa.String(length=16), nullable=False),
        sa.Column("duplicate_of", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["duplicate_of"], ["samples.id"]),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sample_id"),
    )
    _index("quarantine", "ix_quarantine_uri", "uri")
    _table(
        "reviews",
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("votes", sa.Text(), nullable=False),
        sa.Column("since", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"]),
        sa.PrimaryKeyConstraint("sample_id"),
    )
    _table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sample_id", sa.Integer(), nullable=False),
        sa.Column("ls_project_id", sa.Integer(), nullable=False),
        sa.Column("ls_task_id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=True),
        sa.Column("model_version", sa.String(length=64), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["round_id"], ["rounds.id"]),
        sa.ForeignKeyConstraint(["sample_id"], ["samples.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("ls_task_id"),
        sa.UniqueConstraint("sample_id"),
    )


def downgrade() -> None:
    op.drop_table("tasks")
    op.drop_table("reviews")
    with op.batch_alter_table("quarantine", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_quarantine_uri"))

    op.drop_table("quarantine")
    with op.batch_alter_table("provenance", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_provenance_round_id"))

    op.drop_table("provenance")
    op.drop_table("labels")
    with op.batch_alter_table("label_reviews", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_label_reviews_status"))

    op.drop_table("label_reviews")
    with op.batch_alter_table("label_history", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_label_history_sample_id"))

    op.drop_table("label_history")
    op.drop_table("forecasts")
    with op.batch_alter_table("annotations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_annotations_sample_id"))
        batch_op.drop_index(batch_op.f("ix_annotations_ls_task_id"))
        batch_op.drop_index(batch_op.f("ix_annotations_ls_project_id"))

    op.drop_table("annotations")
    with op.batch_alter_table("webhook_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_events_body_sha256"))

    op.drop_table("webhook_events")
    with op.batch_alter_table("samples", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_samples_split"))
        batch_op.drop_index(batch_op.f("ix_samples_content_hash"))

    op.drop_table("samples")
    op.drop_table("rounds")
    op.drop_table("meta")
    op.drop_table("classes")
