"""Baseline: the index (instances, studies with their version claim) and the outbox.

Revision ID: 0001
Revises:
Create Date: 2026-12-02

`if_not_exists`: an embedded SQLite file that created these tables itself (before it was ever upgraded
with Alembic) is adopted as it is.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("sop_uid", sa.Text, primary_key=True),
        sa.Column("study_uid", sa.Text, nullable=False),
        sa.Column("series_uid", sa.Text, nullable=False),
        sa.Column("sop_class_uid", sa.Text, nullable=False),
        sa.Column("modality", sa.Text, nullable=False),
        sa.Column("laterality", sa.Text, nullable=False),
        sa.Column("frames", sa.Integer, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("calling_ae", sa.Text, nullable=False),
        sa.Column("acquisition_datetime", sa.Text, nullable=False),
        sa.Column("transfer_syntax", sa.Text, nullable=False),
        if_not_exists=True,
    )
    op.create_index("instances_by_study", "instances", ["study_uid"], if_not_exists=True)
    op.create_table(
        "studies",
        sa.Column("study_uid", sa.Text, primary_key=True),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="0"),
        sa.Column("detail", sa.Text, nullable=False, server_default=""),
        sa.Column("instance_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("first_received_at", sa.Double, nullable=False),
        sa.Column("last_received_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("claimed_by", sa.Text, nullable=False, server_default=""),
        sa.Column("claimed_at", sa.Double),
        if_not_exists=True,
    )
    op.create_index("studies_by_state", "studies", ["state", "last_received_at"], if_not_exists=True)
    op.create_table(
        "outbox",
        sa.Column("sr_uid", sa.Text, primary_key=True),
        sa.Column("study_uid", sa.Text, nullable=False),
        sa.Column("study_version", sa.Integer, nullable=False),
        sa.Column("bundle_version", sa.Text, nullable=False),
        sa.Column("eye", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=False, server_default=""),
        sa.Column("claimed_by", sa.Text, nullable=False, server_default=""),
        sa.Column("claimed_at", sa.Double),
        sa.Column("destination", sa.Text, nullable=False, server_default=""),
        sa.Column("note", sa.Text, nullable=False, server_default=""),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("delivered_at", sa.Double),
        sa.Column("kind", sa.Text, nullable=False, server_default="SR"),
        if_not_exists=True,
    )
    op.create_index("outbox_study", "outbox", ["study_uid", "study_version"], if_not_exists=True)
    op.create_index("outbox_state", "outbox", ["state"], if_not_exists=True)


def downgrade() -> None:
    for table in ("outbox", "studies", "instances"):
        op.drop_table(table)
