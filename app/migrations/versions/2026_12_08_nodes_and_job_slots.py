"""Multi-node jobs: jobs.nodes, and job_slots, one row per node of a gang-scheduled run

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("nodes", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(
            sa.Column("min_nodes", sa.Integer(), nullable=False, server_default="1")
        )
    op.create_table(
        "job_slots",
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("lease", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("claim", sa.JSON(), nullable=False),
        sa.Column("outcome", sa.JSON(), nullable=True),
        sa.Column("released", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "slot"),
    )
    op.create_index("ix_job_slots_worker", "job_slots", ["worker"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_job_slots_worker", table_name="job_slots")
    op.drop_table("job_slots")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("min_nodes")
        batch_op.drop_column("nodes")
