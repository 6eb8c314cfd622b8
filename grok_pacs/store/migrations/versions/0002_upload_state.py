"""Upload state: an instance is LOCAL until its uploader records the object-store key it wrote.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Two columns with defaults (every instance a database already holds starts LOCAL) and an index on the
state, so that the uploader and assembly find the LOCAL instances without scanning all of them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("upload_state", sa.Text, nullable=False, server_default="LOCAL"))
    op.add_column("instances", sa.Column("blob_key", sa.Text, nullable=False, server_default=""))
    op.create_index("instances_by_upload_state", "instances", ["upload_state", "received_at"])


def downgrade() -> None:
    op.drop_index("instances_by_upload_state", "instances")
    op.drop_column("instances", "blob_key")
    op.drop_column("instances", "upload_state")
