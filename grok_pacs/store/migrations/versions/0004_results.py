"""The results register: one row per eye's AI result and its state after delivery (issue #34).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

A new table (grok_pacs.store.register) with the worklist's indexes: (state, created_at), label, study.
Results delivered before this revision are not back-filled: the register starts with the next analysis.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _text(name: str) -> sa.Column:
    return sa.Column(name, sa.Text, nullable=False, server_default="")


def upgrade() -> None:
    op.create_table(
        "results",
        sa.Column("sr_uid", sa.Text, primary_key=True),
        sa.Column("study_uid", sa.Text, nullable=False),
        sa.Column("study_version", sa.Integer, nullable=False),
        sa.Column("bundle_version", sa.Text, nullable=False),
        sa.Column("eye", sa.Text, nullable=False),
        _text("label"),
        sa.Column("probability", sa.Double),
        _text("disposition"),
        _text("gradability"),
        _text("pdf_uid"),
        _text("cfp_uid"),
        _text("oct_uid"),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("updated_at", sa.Double, nullable=False),
        sa.Column("delivered_at", sa.Double),
        _text("replaced_by"),
        _text("withdraw_reason"),
        _text("rejection_uid"),
        _text("review_outcome"),
        _text("reviewed_label"),
        _text("reviewer"),
        _text("review_note"),
        sa.Column("reviewed_at", sa.Double),
        _text("verified_uid"),
        if_not_exists=True,
    )
    op.create_index("results_by_state", "results", ["state", "created_at"], if_not_exists=True)
    op.create_index("results_by_label", "results", ["label"], if_not_exists=True)
    op.create_index("results_by_study", "results", ["study_uid"], if_not_exists=True)


def downgrade() -> None:
    op.drop_table("results")
