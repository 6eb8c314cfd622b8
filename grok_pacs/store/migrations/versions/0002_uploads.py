"""Uploads: an instance is LOCAL until this table holds the object-store key its uploader wrote.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

A table of its own (not a column of `instances`): the listener's insert is unchanged and an existing
database only gains an empty table, so every instance it already holds starts LOCAL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "uploads",
        sa.Column("sop_uid", sa.Text, primary_key=True),
        sa.Column("study_uid", sa.Text, nullable=False),
        sa.Column("blob_key", sa.Text, nullable=False),
        sa.Column("uploaded_at", sa.Double, nullable=False),
        if_not_exists=True,
    )


def downgrade() -> None:
    op.drop_table("uploads")
