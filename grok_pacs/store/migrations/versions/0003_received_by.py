"""Which listener received each instance: `instances.received_by` (Settings.node_id).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

With two listeners on one database, each one's recovery and uploader act only on the rows it received:
the file of another listener's instance is on that listener's disk, not missing. Rows a database held
before this revision get '' (no listener claims them): PostgreSQL with several listeners was not
released before it. The embedded SQLite file is one host's and is not scoped by this column.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("received_by", sa.Text, nullable=False, server_default=""))


def downgrade() -> None:
    op.drop_column("instances", "received_by")
